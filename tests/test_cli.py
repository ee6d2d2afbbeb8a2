"""``peft-alps localize``: writes a valid scores JSON and PNG, prints the top heads, fails cleanly."""

import json

import pytest
import torch

from peft_alps import HeadScores, localize_heads
from peft_alps_cli import build_parser, main
from tests.support.tiny_models import tiny_llama


@pytest.fixture
def pair(tmp_path):
    base, task = tiny_llama(), tiny_llama()
    with torch.no_grad():
        task.model.layers[2].self_attn.q_proj.weight[6 * 8 : 7 * 8] += 0.5  # head 6 of layer 2
    base.save_pretrained(tmp_path / "base")
    task.save_pretrained(tmp_path / "task")
    return tmp_path / "base", tmp_path / "task"


def test_localize_writes_json_and_png(pair, tmp_path, capsys):
    base, task = pair
    out, png = tmp_path / "out" / "heads.json", tmp_path / "heads.png"
    code = main(["localize", "--base", str(base), "--task", str(task), "--k", "1", "--metric", "kl",
                 "--output", str(out), "--heatmap", str(png), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["metric"] == "kl" and data["shape"] == [3, 8]
    scores = HeadScores.load(out)
    assert scores.scores.tobytes() == localize_heads(base, task, metric="kl").scores.tobytes()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "selected 1 of 24 heads: {2: [6]}" in printed
    assert "ratio" not in printed.split("use them with:")[1] and "k=1" in printed


def test_localize_default_ratio_and_errors(pair, tmp_path, capsys):
    base, task = pair
    assert main(["localize", "--base", str(base), "--task", str(task), "--output", str(tmp_path / "h.json"),
                 "--no-progress"]) == 0
    assert "selected 3 of 24 heads" in capsys.readouterr().out  # ceil(0.1 * 24)
    code = main(["localize", "--base", str(base), "--task", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.json")])
    assert code == 1 and "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["localize", "--base", "b", "--task", "t", "--output", "o", "--ratio", "0.1", "--k", "2"])


def test_subcommands_are_listed(capsys):
    assert main([]) == 2
    help_text = capsys.readouterr().out
    assert "localize" in help_text and "demo" in help_text


# ------------------------------------------------------------------------------------ mistakes fail early
# Each mistake gives a message that names the value and the fix, before any work: a spy makes the work itself
# (scoring, loading weights, training) fail the test if it is reached.


@pytest.fixture
def no_work(monkeypatch):
    """Scoring, loading weights and the demo all raise if a command reaches them."""
    import peft_alps.demo.toy
    import peft_alps.localization.pad
    from transformers import AutoModelForCausalLM

    def reached(what):
        def spy(*args, **kwargs):
            raise AssertionError(f"{what} started before the mistake was reported")
        return spy

    monkeypatch.setattr(peft_alps.localization.pad, "localize_heads", reached("scoring"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", reached("loading weights"))
    monkeypatch.setattr(peft_alps.demo.toy, "run_demo", reached("the demo"))


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def run_error(capsys, argv) -> str:
    capsys.readouterr()  # what came before (e.g. a fixture's progress bars)
    assert main(argv) == 1
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--ratio", "2"], "argument --ratio: must be in (0, 1], got 2 (the fraction of all heads, e.g. 0.1)"),
    (["demo", "--task", "sort"], "argument --task: invalid choice: 'sort' (choose from 'arithmetic', 'copy', "
                                 "'reverse', 'brackets', 'text')"),
    (["demo", "--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["warmup", "--base", "b", "--data", "d", "--output", "o", "--fraction", "2"],
     "argument --fraction: must be in (0, 1], got 2 (the share of the data, e.g. 0.1 for 10%)"),
    (["warmup", "--base", "b", "--data", "d", "--output", "o", "--projections", "q,x"],
     "argument --projections: unknown projection 'x' in 'q,x'; choose a comma-separated subset of q,k,v,o, e.g. q,k,v"),
    (["warmup", "--base", "b", "--data", "d", "--output", "o", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["warmup", "--base", "b", "--data", "d", "--output", "o", "--lr", "x"], "argument --lr: expected a number > 0, got 'x'"),
    (["localize", "--base", "b", "--task", "t", "--output", "o", "--ratio", "0"],
     "argument --ratio: must be in (0, 1], got 0 (the fraction of all heads, e.g. 0.1)"),
    (["localize", "--base", "b", "--task", "t", "--output", "o", "--k", "0"], "argument --k: must be >= 1, got 0"),
    (["localize", "--base", "b", "--task", "t", "--output", "o", "--tau", "-1"], "argument --tau: must be > 0, got -1"),
])
def test_option_values_are_rejected_while_parsing(argv, message, capsys, no_work):
    assert parse_error(capsys, argv) == f"peft-alps {argv[0]}: error: {message}"


def test_localize_k_above_the_head_count_before_scoring(pair, tmp_path, capsys, no_work):
    base, task = pair
    err = run_error(capsys, ["localize", "--base", str(base), "--task", str(task), "--k", "1000",
                             "--output", str(tmp_path / "h.json")])
    assert err == "peft-alps localize: error: k=1000 out of range: the model has 24 heads, so 1 <= k <= 24"
    assert not (tmp_path / "h.json").exists()


@pytest.mark.parametrize("option", ["--output", "--heatmap"])
def test_localize_unwritable_paths_before_scoring(option, pair, tmp_path, capsys, no_work):
    base, task = pair
    paths = {"--output": str(tmp_path / "h.json"), "--heatmap": str(tmp_path / "h.png")}
    paths[option] = "/proc/nope/heads.x"
    argv = ["localize", "--base", str(base), "--task", str(task)] + [x for kv in paths.items() for x in kv]
    err = run_error(capsys, argv)
    assert err.startswith(f"peft-alps localize: error: {option} '/proc/nope/heads.x' is not writable ('/proc': ")
    assert err.endswith("pick a folder you can write to")
    assert not (tmp_path / "h.json").exists()
    paths[option] = str(tmp_path)  # an existing folder where a file is wanted
    err = run_error(capsys, ["localize", "--base", str(base), "--task", str(task)] + [x for kv in paths.items() for x in kv])
    assert f"{option} {str(tmp_path)!r} is a folder; pass a file path" in err


def test_warmup_unwritable_output_before_loading(pair, tmp_path, capsys, no_work):
    base, _ = pair
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    err = run_error(capsys, ["warmup", "--base", str(base), "--data", str(data), "--output", "/proc/task-attn"])
    assert err.startswith("peft-alps warmup: error: --output '/proc/task-attn' is not writable")
    (tmp_path / "file").write_text("x")
    err = run_error(capsys, ["warmup", "--base", str(base), "--data", str(data), "--output", str(tmp_path / "file" / "o")])
    assert "cannot be created" in err and "is a file, not a folder" in err


def test_demo_unwritable_output_before_training(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    err = run_error(capsys, ["demo", "--quick", "--output", str(tmp_path / "file")])
    assert err == f"peft-alps demo: error: --output {str(tmp_path / 'file')!r} is a file; pass a folder (it is created if missing)"


@pytest.mark.parametrize("bad", ["notamodel", "no/such/folder", "emptydir", "noconfig"])
def test_not_a_checkpoint_folder_reads_the_same_in_every_command(bad, tmp_path, capsys, monkeypatch, no_work, pair):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "config.json").write_text('{"hidden_size": 8}')  # no model_type
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    _, task = pair
    localize = run_error(capsys, ["localize", "--base", bad, "--task", str(task), "--output", "h.json"])
    warmup = run_error(capsys, ["warmup", "--base", bad, "--data", str(data), "--output", "o"])
    assert localize.removeprefix("peft-alps localize: ") == warmup.removeprefix("peft-alps warmup: ")
    assert repr(bad) in localize
    expected = {"notamodel": "is not a local folder, and its config.json could not be fetched",
                "no/such/folder": "does not exist (and it is not a Hub repo id)",
                "emptydir": "is not a checkpoint folder: it has no config.json",
                "noconfig": "is not a checkpoint folder transformers can read"}[bad]
    assert expected in localize


def test_help_lists_the_choices(capsys):
    for command, listed in (("demo", "{arithmetic,copy,reverse,brackets,text}"),
                            ("localize", "{wasserstein,kl,js,cosine,euclidean}"),
                            ("warmup", "{adamw,adamw8bit,adafactor}")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert listed in capsys.readouterr().out


def test_parser_constants_equal_their_sources():
    from dataclasses import fields

    import importlib

    import peft_alps_cli as cli
    from peft_alps.localization import pad as localization
    from peft_alps.demo import synthetic
    from peft_alps.demo.toy import DemoSettings
    from peft_alps_cli import options

    warmup = importlib.import_module("peft_alps.warmup.train")
    assert cli.METRICS == localization.METRICS and cli.VARIANTS == localization.VARIANTS
    assert cli.OPTIMIZERS == warmup.OPTIMIZERS and options.ATTENTION_ROLES == warmup.ATTENTION_ROLES
    assert cli.DEMO_TASKS == synthetic.SKILLS
    assert {f.name for f in fields(DemoSettings)} >= set(cli.TOY_ONLY)


def test_help_imports_nothing_heavy():
    """``peft-alps`` (the console script) parses and prints help with the standard library alone."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["peft-alps"]
    module, func = script.split(":")
    code = (f"import sys\nfrom {module} import {func} as main\n"
            "for argv in (['--help'], ['localize', '--help'], ['warmup', '--help'], ['demo', '--help'], ['demo', '--ratio', '2']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'peft_alps', 'numpy') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "must be in (0, 1]" in proc.stderr


def test_import_is_quiet_and_the_bitsandbytes_filter_is_narrow(caplog):
    import logging
    import subprocess
    import sys

    from peft_alps.integrations import quiet

    proc = subprocess.run([sys.executable, "-c", "import peft_alps"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "" and quiet.BNB_KERNELS_NOTICE not in proc.stderr, proc.stderr
    quiet.install()
    logger = logging.getLogger(quiet.BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning(quiet.BNB_KERNELS_NOTICE + ": %s", "No module named 'kernels'")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records if r.name == quiet.BNB_CPU_LOGGER] == ["something else went wrong"]
