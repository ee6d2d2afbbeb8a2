#!/usr/bin/env python
"""Serve ALPS exports in llama.cpp: convert them with llama.cpp's own converters, compare logits (optional, not CI).

For each model (a tiny Llama built here, and SmolLM2-135M when ``peft_alps.demo.builtin_models`` can materialize it):

1. ``convert_hf_to_gguf.py`` turns the base checkpoint into an f32 GGUF; llama.cpp's logits on it are compared with
   transformers' (``base``), so the adapter figures below are read against the conversion's own error;
2. an ALPS adapter with random deltas (default ``bias="none"``) is exported with ``export_to_lora``, converted with
   ``convert_lora_to_gguf.py`` and applied by llama.cpp (through llama-cpp-python): its logits are compared with the
   ALPS model's (``default export``), next to how far the adapter moves the logits at all (``adapter effect``);
3. the same adapter exported with ``per_module_ranks=True``: PEFT reloads it exactly, llama.cpp does not (it keeps
   one ``lora_alpha`` and scales each tensor by alpha / its own rank; ``export_to_lora`` warns about it).

Then what llama.cpp's converter says about a tiny Qwen2 adapter: the default export converts, an ``alps_bias=True`` (``"heads"``)
export is refused (its ``lora_B.bias`` tensors).

The converters live in the llama.cpp repository, not on PyPI as scripts, but llama-cpp-python's source
distribution vendors them: ``--fetch`` downloads the sdist of the installed llama-cpp-python version with pip
(``pip download --no-deps --no-binary :all: llama-cpp-python==X``) into the peft-alps cache and extracts the
converters; or point ``--llama-cpp`` at a llama.cpp checkout (or at ``vendor/llama.cpp`` of an extracted sdist).
The converters need their own requirements (``requirements/requirements-convert_lora_to_gguf.txt``: torch,
transformers, numpy, sentencepiece, ...); ``--converter-python`` runs them with another interpreter that has them.
When a piece is missing the script says which one and how to get it, writes ``{"skipped": ...}`` and exits 0.

    python benchmarks/serve_check.py --fetch
    python benchmarks/serve_check.py --llama-cpp ~/src/llama.cpp --models tiny
    python benchmarks/serve_check.py --fetch --converter-python /path/to/venv/bin/python

Results: ``benchmarks/results/serve_check.json`` and ``.md`` (``--out`` for another stem).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, environment, finish_environment, produced_by  # noqa: E402

CONVERTERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
CONVERTER_NEEDS = ("numpy", "torch", "transformers", "safetensors", "sentencepiece")
SDIST_KEEP = ("convert_", "conversion/", "gguf-py/", "requirements/")  # what the converters import or document
TINY_VOCAB = 3 + 256  # <unk> <s> </s> and the 256 byte tokens of a byte-fallback BPE with no merges


class Skip(Exception):
    """A missing piece: the message says which one and how to get it."""


# ------------------------------------------------------------------------------------------------ the pieces


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as exc:
        raise Skip(f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python") from None
    return llama_cpp


def fetch_converters(version: str) -> Path:
    """The ``vendor/llama.cpp`` converters of llama-cpp-python ``version``'s sdist, downloaded once into the cache."""
    from peft_alps.demo.builtin_models import cache_root

    target = cache_root() / "llama.cpp" / f"llama-cpp-python-{version}"
    if all((target / name).is_file() for name in CONVERTERS):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={version}", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise Skip(f"could not download the llama-cpp-python {version} sdist ({' '.join(command)}): "
                       f"{done.stderr.strip()[-300:]}")
        with tarfile.open(archives[0]) as archive:
            prefix = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(SDIST_KEEP)]
            for member in members:
                member.name = member.name[len(prefix):]
            staging = target.with_name(target.name + ".tmp")
            archive.extractall(staging, members=members, filter="data")
        staging.replace(target)
    return target


def converter_dir(args: argparse.Namespace, llama_cpp) -> Path:
    if args.llama_cpp is not None:
        folder = Path(args.llama_cpp).expanduser()
    elif args.fetch:
        folder = fetch_converters(llama_cpp.__version__)
    else:
        raise Skip("no llama.cpp converters: pass --fetch (downloads the llama-cpp-python sdist, which vendors "
                   "them) or --llama-cpp path/to/llama.cpp")
    missing = [name for name in CONVERTERS if not (folder / name).is_file()]
    if missing:
        raise Skip(f"{folder} has no {', '.join(missing)}: point --llama-cpp at a llama.cpp checkout, or use --fetch")
    return folder


def check_converter_python(python: str, folder: Path) -> None:
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    done = subprocess.run([python, "-c", probe, *CONVERTER_NEEDS], capture_output=True, text=True)
    missing = done.stdout.split() if done.returncode == 0 else list(CONVERTER_NEEDS)
    if missing:
        raise Skip(f"the converters need {', '.join(missing)} in {python}: pip install -r "
                   f"{folder / 'requirements' / 'requirements-convert_lora_to_gguf.txt'} (into another venv, then "
                   "pass its python with --converter-python)")


def convert(python: str, script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(script), *args], capture_output=True, text=True)


def converted(python: str, script: Path, *args: str) -> None:
    done = convert(python, script, *args)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------------ models


def save_tiny_llama(folder: Path) -> list[int]:
    """A tiny random Llama with a byte-level tokenizer that llama.cpp's converter accepts; returns probe tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])  # what the converter expects
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=TINY_VOCAB,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return [1, *torch.randint(3, TINY_VOCAB, (15,), generator=torch.Generator().manual_seed(3)).tolist()]


def smollm2_folder() -> tuple[Path, list[int]]:
    from transformers import AutoTokenizer

    from peft_alps.demo import builtin_models as models

    try:
        folder = Path(models.load("smollm2-135m"))
    except Exception as exc:  # the wheel or gguf missing: that model is left out
        raise Skip(f"smollm2-135m unavailable: {exc}") from None
    text = "ALPS localizes the attention heads a task moved most, then trains only those heads."
    return folder, AutoTokenizer.from_pretrained(folder)(text).input_ids


#: name -> (how to get the base folder and probe tokens, heads of the adapter, delta scale)
MODELS = {
    "tiny": ({0: [1, 2], 2: [5]}, 0.3),
    "smollm2-135m": ({3: [0, 4], 12: [2], 25: [7, 8]}, 0.05),
}


def alps_with_random_deltas(base, heads: dict, scale: float, **config):
    from peft import get_peft_model

    from peft_alps import AlpsConfig

    model = get_peft_model(base, AlpsConfig(target_heads=heads, init_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".alps_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * scale)
    return model.eval()


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def llama_cpp_logits(llama_cpp, gguf: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    """All-position logits from llama.cpp, f32 KV cache (its f16 default would dominate the comparison)."""
    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=max(64, len(tokens)), n_threads=torch.get_num_threads(), verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------------------ checks


def check_model(name: str, work: Path, folder_cpp: Path, python: str, llama_cpp) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_alps import export_to_lora

    heads, scale = MODELS[name]
    if name == "tiny":
        base_dir = work / name / "base"
        tokens = save_tiny_llama(base_dir)
    else:
        base_dir, tokens = smollm2_folder()
    started = time.perf_counter()
    (work / name).mkdir(parents=True, exist_ok=True)
    base_gguf = work / name / "base-f32.gguf"
    converted(python, folder_cpp / "convert_hf_to_gguf.py", str(base_dir), "--outtype", "f32",
              "--outfile", str(base_gguf))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ref = hf_logits(base, tokens)
    model = alps_with_random_deltas(base, heads, scale)
    alps = hf_logits(model, tokens)
    result = {"model": name, "heads": {str(k): v for k, v in heads.items()}, "tokens": len(tokens),
              "adapter_effect": max_abs(alps, ref),
              "base_llama_cpp_vs_hf": max_abs(llama_cpp_logits(llama_cpp, base_gguf, tokens), ref)}
    for mode, kwargs in (("default", {}), ("per_module_ranks", {"per_module_ranks": True})):
        lora_dir, lora_gguf = work / name / f"lora-{mode}", work / name / f"lora-{mode}.gguf"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_to_lora(model, lora_dir, **kwargs)
        converted(python, folder_cpp / "convert_lora_to_gguf.py", "--base", str(base_dir), "--outtype", "f32",
                  "--outfile", str(lora_gguf), str(lora_dir))
        result[mode] = {
            "rank": json.loads((lora_dir / "adapter_config.json").read_text())["r"],
            "export_warnings": [str(w.message) for w in caught],
            "llama_cpp_vs_alps": max_abs(llama_cpp_logits(llama_cpp, base_gguf, tokens, lora_gguf), alps),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
            result[mode]["peft_vs_alps"] = max_abs(hf_logits(PeftModel.from_pretrained(fresh, lora_dir), tokens), alps)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def check_bias_refusal(work: Path, folder_cpp: Path, python: str) -> dict:
    """What convert_lora_to_gguf.py says about a tiny Qwen2 adapter, default and alps_bias=True (config-only base)."""
    import transformers

    from peft_alps import export_to_lora

    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=TINY_VOCAB,
                                      architectures=["Qwen2ForCausalLM"])  # what the converter dispatches on
    base_dir = work / "qwen2" / "base"
    config.save_pretrained(base_dir)
    torch.manual_seed(0)
    out = {}
    for bias in ("none", "heads"):
        model = alps_with_random_deltas(transformers.AutoModelForCausalLM.from_config(config), {0: [1], 1: [0, 3]},
                                        0.1, alps_bias=bias == "heads")
        lora_dir = work / "qwen2" / f"lora-{bias}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # alps_bias=True: the warning this check backs up
            export_to_lora(model, lora_dir)
        done = convert(python, folder_cpp / "convert_lora_to_gguf.py", "--base", str(base_dir), "--outtype", "f32",
                       "--outfile", str(work / "qwen2" / f"lora-{bias}.gguf"), str(lora_dir))
        lines = done.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
        out[bias] = {"returncode": done.returncode, "message": errors[0] if done.returncode else ""}
    return out


# ------------------------------------------------------------------------------------------------ report


def write_report(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Serving ALPS exports in llama.cpp", ""]
    if "skipped" in payload:
        lines += [f"Skipped: {payload['skipped']}", ""]
    else:
        lines += ["Max abs logit difference over all positions (f32 GGUF, f32 KV cache).", "",
                  "| model | base: llama.cpp vs HF | adapter effect (ALPS vs base) | default export: llama.cpp vs ALPS "
                  "| per_module_ranks: llama.cpp vs ALPS | per_module_ranks: PEFT vs ALPS |",
                  "|---|---|---|---|---|---|"]
        for r in payload["models"]:
            if "skipped" in r:
                lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['base_llama_cpp_vs_hf']:.2g} | {r['adapter_effect']:.3g} | "
                         f"{r['default']['llama_cpp_vs_alps']:.2g} | {r['per_module_ranks']['llama_cpp_vs_alps']:.3g} "
                         f"| {r['per_module_ranks']['peft_vs_alps']:.2g} |")
        lines += ["", "convert_lora_to_gguf.py on a tiny Qwen2 adapter:", ""]
        for bias, r in payload["qwen2_converter"].items():
            lines.append(f"- `bias={bias!r}`: " + ("converted" if r["returncode"] == 0 else
                                                   f"refused (exit {r['returncode']}): `{r['message']}`"))
        lines.append("")
    lines.append(produced_by(payload["environment"], payload.get("duration", "")))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", help="folder with llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py")
    parser.add_argument("--fetch", action="store_true",
                        help="download the installed llama-cpp-python version's sdist (pip) and use its converters")
    parser.add_argument("--converter-python", default=sys.executable,
                        help="interpreter that runs the converters (needs their requirements)")
    parser.add_argument("--models", default="tiny,smollm2-135m", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--out", default=str(RESULTS / "serve_check"), help="output path stem (.json and .md)")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(MODELS)}")

    env = environment()
    started = time.perf_counter()
    try:
        llama_cpp = llama_cpp_module()
        folder = converter_dir(args, llama_cpp)
        check_converter_python(args.converter_python, folder)
    except Skip as skip:
        print(f"serve_check skipped: {skip}")
        write_report(Path(args.out), {"skipped": str(skip), "environment": finish_environment(env)})
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = []
        for name in names:
            try:
                results.append(check_model(name, work, folder, args.converter_python, llama_cpp))
            except Skip as skip:
                results.append({"model": name, "skipped": str(skip)})
            print(json.dumps(results[-1], indent=2))
        qwen2 = check_bias_refusal(work, folder, args.converter_python)
    payload = {"llama_cpp_python": llama_cpp.__version__, "converters": str(folder), "models": results,
               "qwen2_converter": qwen2, "environment": finish_environment(env),
               "duration": f" in {(time.perf_counter() - started) / 60:.1f} min"}
    write_report(Path(args.out), payload)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
