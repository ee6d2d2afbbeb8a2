#!/usr/bin/env python
"""Run SGLang's own LoRA-loading functions on both export forms of an ALPS adapter (optional, not CI).

SGLang ships on PyPI as a wheel with its Python sources. ``--fetch`` downloads that wheel (``pip download
--no-deps sglang==VERSION``) into the peft-alps cache; nothing is installed, and SGLang's GPU dependencies are
never imported. Two of its functions are read out of the wheel's source (by name, with ``ast``) and run as
written, on the tensors of each export:

- ``LoRAAdapter.normalize_qkv_proj`` (``sglang/srt/lora/lora.py``): per layer, stacks q, k and v into one
  ``qkv_proj`` tensor; a layer with q but not v raises ``KeyError`` here, at load;
- ``get_target_module_name`` with ``get_normalized_target_modules`` (``sglang/srt/lora/utils.py``): maps every
  normalized tensor to a memory-pool buffer; a name with no buffer (k or v left unstacked because q is missing)
  raises ``ValueError``, at the first batch.

A layer with no tensors at all is zero-filled by SGLang's memory pool, so it serves as trained.

LoRAX and TGI are not on PyPI (their servers live only in their GitHub repositories), so they are not run here;
``tests/test_export.py`` checks both forms against their rule (a projection type that any layer lacks is dropped
for every layer: LoRAX ``server/lorax_server/adapters/lora.py``, TGI ``server/text_generation_server/adapters/lora.py``).

    python benchmarks/serve_check_engines.py --fetch [--sizes]   # --sizes: both forms' size on SmolLM2-135M

Results: ``benchmarks/results/serve_check_engines.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, environment, finish_environment, markdown_table, produced_by  # noqa: E402

SGLANG_VERSION = "0.5.23"
SOURCES = {"normalize_qkv_proj": "sglang/srt/lora/lora.py", "get_target_module_name": "sglang/srt/lora/utils.py",
           "get_normalized_target_modules": "sglang/srt/lora/utils.py"}


class Skip(Exception):
    """A missing piece: the message says which one and how to get it."""


def sglang_wheel(version: str, fetch: bool) -> Path:
    from peft_alps.demo.builtin_models import cache_root

    folder = cache_root() / "engines"
    found = sorted(folder.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[0]
    if not fetch:
        raise Skip(f"no sglang {version} wheel in {folder}: pass --fetch (pip download --no-deps sglang=={version})")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               f"sglang=={version}", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("sglang-*.whl"))
        if done.returncode != 0 or not wheels:
            raise Skip(f"could not download sglang=={version}: {done.stderr.strip()[-300:]}")
        return wheels[0].replace(folder / wheels[0].name)


def sglang_functions(wheel: Path) -> dict[str, Callable]:
    """The named functions, compiled from the wheel's own source (methods become plain functions of ``self``)."""
    from typing import Dict, Iterable, List, Optional, Set, Union

    namespace: dict[str, Any] = {"torch": torch, "re": re, "Dict": Dict, "Iterable": Iterable, "List": List,
                                 "Optional": Optional, "Set": Set, "Union": Union}
    with zipfile.ZipFile(wheel) as archive:
        for name, path in SOURCES.items():
            tree = ast.parse(archive.read(path).decode())
            node = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name), None)
            if node is None:
                raise Skip(f"{path} in {wheel.name} has no function {name!r}: SGLang changed; update this check")
            node.decorator_list = []
            exec(compile(ast.Module(body=[node], type_ignores=[]), f"{wheel.name}/{path}", "exec"), namespace)
    return {name: namespace[name] for name in SOURCES}


def sglang_load(fns: dict[str, Callable], adapter: Path, num_layers: int) -> dict[str, Any]:
    """What SGLang's loader does with one exported adapter: per layer, served / zero-filled / refused."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    targets = fns["get_normalized_target_modules"](config["target_modules"])
    layers: dict[str, int] = {"loaded": 0, "zero-filled": 0}
    problems = []
    for layer in range(num_layers):
        weights = {k: v for k, v in tensors.items() if re.search(rf"\.layers\.{layer}\.", k)}
        if not weights:
            layers["zero-filled"] += 1
            continue
        try:
            fns["normalize_qkv_proj"](None, list(weights), weights)
        except KeyError as err:
            problems.append(f"layer {layer}: KeyError {err} at load (normalize_qkv_proj)")
            continue
        try:
            for name in weights:
                fns["get_target_module_name"](name, targets)
        except ValueError as err:
            problems.append(f"layer {layer}: {err} (at the first batch)")
            continue
        layers["loaded"] += 1
    return {"layers": layers, "problems": problems, "verdict": "refused" if problems else "served as trained"}


def exports(work: Path) -> dict[str, tuple[Path, int]]:
    """Both forms of one tiny-Llama ALPS adapter, and an owned export of a q/k-only adapter (SGLang's hard case)."""
    import transformers
    from peft import get_peft_model

    from peft_alps import AlpsConfig, export_to_lora

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    out = {}
    for name, kw, targets in (("default (layers='all')", {}, None), ("layers='owned'", {"layers": "owned"}, None),
                              ("layers='owned', q/k only", {"layers": "owned"}, ["q_proj", "k_proj"])):
        torch.manual_seed(0)
        extra = {"target_modules": targets} if targets else {}
        model = get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg),
                               AlpsConfig(target_heads={1: [0], 3: [2]}, init_weights=False, **extra))
        folder = work / re.sub(r"\W+", "_", name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_to_lora(model, folder, **kw)
        out[name] = (folder, cfg.num_hidden_layers)
    return out


def export_sizes(ratio: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Both export forms of an ALPS adapter on SmolLM2-135M (``ratio`` of the heads, drawn at random): file size,
    rank and number of modules."""
    import transformers
    from peft import get_peft_model

    from peft_alps import AlpsConfig, export_to_lora, select_random
    from peft_alps.demo import builtin_models as models

    base = transformers.AutoModelForCausalLM.from_pretrained(models.load("smollm2-135m"))
    cfg = base.config
    heads = select_random(cfg.num_hidden_layers, cfg.num_attention_heads, ratio=ratio, seed=seed)
    model = get_peft_model(base, AlpsConfig(target_heads=heads))
    out = {"heads": sum(map(len, heads.values())), "layers_with_heads": len(heads), "layers": cfg.num_hidden_layers}
    with tempfile.TemporaryDirectory() as tmp:
        for form in ("all", "owned"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_to_lora(model, Path(tmp) / form, layers=form)
            config = json.loads((Path(tmp) / form / "adapter_config.json").read_text())
            from safetensors import safe_open

            with safe_open(str(Path(tmp) / form / "adapter_model.safetensors"), "pt") as f:
                modules = len(f.keys()) // 2
            out[form] = {"bytes": (Path(tmp) / form / "adapter_model.safetensors").stat().st_size, "r": config["r"],
                         "modules": modules}
    return out


def write_report(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# SGLang's loader on ALPS exports", ""]
    if "skipped" in payload:
        lines += [f"Skipped: {payload['skipped']}", ""]
    else:
        lines += [f"SGLang {payload['sglang']} (functions run from its wheel's source); a tiny Llama, 4 layers, heads "
                  "in layers 1 and 3.", "",
                  markdown_table(["export", "SGLang", "layers loaded", "layers zero-filled", "problems"],
                                 [[k, v["verdict"], v["layers"]["loaded"], v["layers"]["zero-filled"],
                                   "; ".join(v["problems"]) or "-"] for k, v in payload["sglang_results"].items()]),
                  ""]
    sizes = payload.get("sizes")
    if sizes:
        lines += [f"Export size on SmolLM2-135M, {sizes['heads']} random heads (10%) in {sizes['layers_with_heads']} of "
                  f"{sizes['layers']} layers, float32:", "",
                  markdown_table(["form", "file MiB", "rank", "modules"],
                                 [[f"layers={form!r}", f"{sizes[form]['bytes'] / 2**20:.1f}", sizes[form]["r"],
                                   sizes[form]["modules"]] for form in ("all", "owned")]), ""]
    lines.append(produced_by(payload["environment"], payload.get("duration", "")))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help=f"download the sglang {SGLANG_VERSION} wheel (pip)")
    parser.add_argument("--sglang-version", default=SGLANG_VERSION)
    parser.add_argument("--out", default=str(RESULTS / "serve_check_engines"), help="output path stem")
    parser.add_argument("--sizes", action="store_true", help="also the size of both forms on SmolLM2-135M")
    args = parser.parse_args(argv)
    env = environment()
    started = time.perf_counter()
    try:
        fns = sglang_functions(sglang_wheel(args.sglang_version, args.fetch))
    except Skip as skip:
        print(f"serve_check_engines skipped: {skip}")
        write_report(Path(args.out), {"skipped": str(skip), "environment": finish_environment(env)})
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: sglang_load(fns, folder, n) for name, (folder, n) in exports(Path(tmp)).items()}
    payload = {"sglang": args.sglang_version, "sglang_results": results,
               **({"sizes": export_sizes()} if args.sizes else {}), "environment": finish_environment(env),
               "duration": f" in {time.perf_counter() - started:.0f} s"}
    write_report(Path(args.out), payload)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
