"""Every code block of README.md and docs/*.md runs as written.

**Python blocks.** Each fenced ```python block runs top to bottom in a fresh ``python`` process, in its own copy
of a small workspace (the current directory), offline, with this checkout on ``PYTHONPATH``. The text is never
edited: placeholders are real things in that workspace or in a short prelude.

Placeholder paths (folders/files in the workspace; relative paths, so write them exactly like this):

- ``"path/to/base"``, ``"my-base"``: a tiny Llama checkpoint (4 layers x 8 query heads, 4 KV heads, head_dim 8,
  hidden 64) with a word-level tokenizer saved next to it;
- ``"path/to/task"``: the same model with a few heads moved (a task model of the base);
- ``"heads.json"``: the head scores of that pair (``HeadScores.save``);
- ``"my-alps"``: an ALPS adapter on the base (heads ``{0: [1, 5], 2: [0]}``); ``"my-lora"``: a LoRA adapter
  (r=4 on q_proj/v_proj) on the base;
- ``"train.jsonl"``: 32 lines of ``{"text": ...}`` in the tokenizer's vocabulary.

Placeholder names (:data:`PRELUDE`; bound only when a block uses the name without assigning it anywhere):
``base_model`` (the base, loaded), ``tokenizer`` (its tokenizer), ``dataset`` (a ``datasets.Dataset`` of
``train.jsonl``).

So a block needs no setup of its own as long as it uses these; keep blocks small (each costs a process start),
and keep head indices inside 4 layers x 8 heads. A block must not emit Python warnings: every warning is
reported and fails the block, unless the comment right before the block allows it by a regex (rare; e.g. a
documented, expected warning):

    <!-- snippet: allow-warning (re: rounding) -->

A block that must not run at all (e.g. it needs a GPU) carries, on the line right before its fence:

    <!-- snippet: skip (reason) -->

**Shell blocks.** Each line of a ```bash block that runs ``peft-alps ...``, ``python benchmarks/...`` (also
behind ``accelerate launch`` / ``torchrun``) is parsed by the command's real argparse parser, without running
it: a typo in an option, a missing required option or a bad choice fails here.

The terminal summary reports how many blocks ran.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import SUMMARY

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*snippet:\s*(skip|allow-warning)\s*\((.*?)\)\s*-->\s*$")
WARNING_TAG = "SNIPPET-WARNING"
# Warnings that the installed libraries raise among themselves, whatever a block does (not ours to fix here).
UPSTREAM_WARNINGS = re.compile("|".join([
    r"FutureWarning: `is_gradient_checkpointing` is deprecated",  # PEFT 0.21's PeftModel.__init__ on transformers 5
    r"FutureWarning: `gradient_checkpointing_enable` is deprecated",  # PEFT 0.21's prepare_model_for_kbit_training
]))

PRELUDE = {
    "base_model": 'from transformers import AutoModelForCausalLM as _A; base_model = _A.from_pretrained("path/to/base")',
    "tokenizer": 'from transformers import AutoTokenizer as _T; tokenizer = _T.from_pretrained("path/to/base")',
    "dataset": 'from datasets import load_dataset as _L; dataset = _L("json", data_files="train.jsonl", split="train")',
}

# Every Python warning in a block is printed with this tag (and then counted by the test).
WARNING_HOOK = textwrap.dedent(f"""\
    import sys as _sys, warnings as _warnings
    def _show(message, category, filename, lineno, file=None, line=None):
        print("{WARNING_TAG}", category.__name__ + ":", str(message).splitlines()[0], f"({{filename}}:{{lineno}})",
              file=_sys.stderr)
    _warnings.showwarning = _show
    """)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("skip" | "allow-warning", text)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_blocks(lang: str) -> list[Block]:
    blocks = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) != lang:
                continue
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            found = MARKER.search(before)
            blocks.append(Block(path, text.count("\n", 0, m.start()) + 1, lang, m.group(2),
                                (found.group(1), found.group(2)) if found else None))
    return blocks


PYTHON_BLOCKS = doc_blocks("python")
BASH_BLOCKS = doc_blocks("bash")


def free_names(code: str) -> set[str]:
    """Names a block reads but never binds (neither assigned, imported, nor defined), builtins aside."""
    tree = ast.parse(code)
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound - set(dir(builtins))


def script_for(block: Block) -> str:
    names = free_names(block.code)
    prelude = [PRELUDE[name] for name in PRELUDE if name in names]
    return "\n".join([WARNING_HOOK, *prelude, "", block.code])


# ------------------------------------------------------------------------------------------ the workspace

WORDS = [f"w{i}" for i in range(90)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=128)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_alps import AlpsConfig, localize_heads
    from tests.support.tiny_models import llama_config

    root = tmp_path_factory.mktemp("snippet-workspace")
    base_dir, task_dir = root / "path" / "to" / "base", root / "path" / "to" / "task"
    torch.manual_seed(0)
    config = llama_config(num_heads=8, num_kv_heads=4, head_dim=8, layers=4, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)
    base = AutoModelForCausalLM.from_config(config)
    tokenizer = make_tokenizer()
    for folder in (base_dir, root / "my-base"):
        base.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    task = AutoModelForCausalLM.from_config(config)
    task.load_state_dict(base.state_dict())
    with torch.no_grad():
        for layer, head in ((1, 3), (2, 6), (3, 0)):
            task.model.layers[layer].self_attn.q_proj.weight[head * 8:(head + 1) * 8] += 0.3
    task.save_pretrained(task_dir)
    localize_heads(base_dir, task_dir).save(root / "heads.json")

    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), AlpsConfig(target_heads={0: [1, 5], 2: [0]})
                   ).save_pretrained(root / "my-alps")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(root / "my-lora")

    rows = [{"text": " ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(12))} for i in range(32)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def counts(request):
    record = {"python blocks ran": 0, "python blocks skipped": 0, "shell commands parsed": 0}
    yield record
    request.config.stash.setdefault(SUMMARY, []).append(
        "docs snippets: " + ", ".join(f"{v} {k}" for k, v in record.items()))


def snippet_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2",
               TOKENIZERS_PARALLELISM="false")
    return env


# ------------------------------------------------------------------------------------------ Python blocks


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs_as_written(block, workspace, counts, tmp_path):
    if block.marker and block.marker[0] == "skip":
        counts["python blocks skipped"] += 1
        pytest.skip(f"{block.id}: {block.marker[1]}")
    cwd = tmp_path / "cwd"
    shutil.copytree(workspace, cwd)
    (tmp_path / "snippet.py").write_text(script_for(block))
    proc = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], cwd=cwd, env=snippet_env(),
                          capture_output=True, text=True, timeout=600)
    output = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{block.id} failed as written:\n{output}"
    allowed = re.compile(block.marker[1].removeprefix("re:").strip()) if block.marker else None
    warnings = [line for line in proc.stderr.splitlines() if line.startswith(WARNING_TAG)
                and not UPSTREAM_WARNINGS.search(line) and not (allowed and allowed.search(line))]
    assert not warnings, f"{block.id} emits warnings:\n" + "\n".join(warnings)
    counts["python blocks ran"] += 1


def test_free_names_and_markers_are_read_right():
    assert free_names("import a\nx = y + a.b\nfor i in x: print(i)\ndef f(z): return z") == {"y"}
    assert script_for(Block(ROOT, 1, "python", "m = base_model\n", None)).count("from_pretrained") == 1
    assert "from_pretrained" not in script_for(Block(ROOT, 1, "python", "base_model = 1\nprint(base_model)\n", None))
    assert MARKER.search("<!-- snippet: skip (needs a GPU) -->").groups() == ("skip", "needs a GPU")
    assert len(PYTHON_BLOCKS) >= 8 and len(SHELL_COMMANDS) >= 8


# ------------------------------------------------------------------------------------------ shell blocks

# Run a script once per command line until it parses its arguments, then stop: its own parser checks each command
# line and nothing else runs. One process per script (its imports happen once); prints "<i> ok" or "<i> bad" lines.
PARSE_ONLY = textwrap.dedent("""\
    import argparse, json, runpy, sys
    class _Parsed(BaseException):
        pass
    _parse = argparse.ArgumentParser.parse_args
    def _parse_then_stop(self, args=None, namespace=None):
        _parse(self, args, namespace)
        raise _Parsed
    argparse.ArgumentParser.parse_args = _parse_then_stop
    script, argvs = sys.argv[1], json.loads(sys.argv[2])
    for i, argv in enumerate(argvs):
        sys.argv = [script, *argv]
        try:
            runpy.run_path(script, run_name="__main__")
            print(i, "bad: ended without parsing its arguments", flush=True)
        except _Parsed:
            print(i, "ok", flush=True)
        except SystemExit as exit:
            print(i, "bad: exit", exit.code, flush=True)
    """)


def parse_script_commands(script: str, argvs: list[list[str]]) -> tuple[list[str], str]:
    """Each command line's verdict ("ok" or "bad: ...") from the script's own parser, and the parser's stderr."""
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, script, json.dumps(argvs)], cwd=ROOT, env=snippet_env(),
                          capture_output=True, text=True, timeout=300)
    verdicts = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0].isdigit())
    return [verdicts.get(str(i), f"bad: no verdict (exit {proc.returncode})") for i in range(len(argvs))], proc.stderr


def cli_commands(block: Block) -> list[list[str]]:
    """The command lines of a shell block that run ``peft-alps`` or a script under ``benchmarks/``."""
    commands = []
    for line in block.code.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        for part in line.split("&&"):
            argv = shlex.split(part)
            if argv and argv[0] == "peft-alps":
                commands.append(argv)
            scripts = [i for i, a in enumerate(argv) if a.startswith("benchmarks/") and a.endswith(".py")]
            if scripts:
                commands.append(["python", *argv[scripts[0]:]])
    return commands


SHELL_COMMANDS = [(b, argv) for b in BASH_BLOCKS for argv in cli_commands(b)]


def test_peft_alps_commands_parse(counts):
    from peft_alps_cli import build_parser

    commands = [(b, argv) for b, argv in SHELL_COMMANDS if argv[0] == "peft-alps"]
    assert {argv[1] for _, argv in commands} >= {"demo", "localize", "warmup"}
    for block, argv in commands:
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exit:
            pytest.fail(f"{block.id}: `{shlex.join(argv)}` does not parse (exit {exit.code})")
        counts["shell commands parsed"] += 1


def test_benchmark_script_commands_parse(counts):
    by_script: dict[str, list[tuple[Block, list[str]]]] = {}
    for block, argv in SHELL_COMMANDS:
        if argv[0] == "python":
            by_script.setdefault(argv[1], []).append((block, argv))
    assert "benchmarks/accelerate/train_alps.py" in by_script
    for script, commands in by_script.items():
        verdicts, stderr = parse_script_commands(script, [argv[2:] for _, argv in commands])
        bad = [f"{b.id}: `{shlex.join(a)}`: {v}" for (b, a), v in zip(commands, verdicts) if v != "ok"]
        assert not bad, "\n".join(bad) + "\n" + stderr[-3000:]
        counts["shell commands parsed"] += len(commands)


def test_a_bad_shell_command_is_caught():
    from peft_alps_cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["localize", "--base", "b", "--task", "t"])  # --output is required
    verdicts, stderr = parse_script_commands("benchmarks/accelerate/train_alps.py",
                                             [["--base", "b", "--heads", "{}", "--output", "o", "--no-such-flag"],
                                              ["--base", "b", "--heads", "{}", "--output", "o"]])
    assert verdicts == ["bad: exit 2", "ok"] and "--no-such-flag" in stderr
