"""The learning rates ``peft-alps demo`` trains its arms at, tuned at the demo's own budget on a dev split.

The demo (``peft_alps.demo.real``) compares ALPS on the top heads, ALPS on random heads and LoRA at equal trainable
parameters, every arm for the same ``adapter_steps`` x ``batch_size``. Here each arm trains exactly as in the demo
(the same warm-up task model, heads, data order and training function) at every rate of a grid, and is scored on a
dev split of the date task that is disjoint from the demo's train and held-out sets. Fixed before any result:

- grid 1e-4, 3e-4, 1e-3, 3e-3 for each family; a family whose best rate is at an edge gets the next rate past that
  edge (x3 or /3), up to 3 times, so that the chosen rate lies strictly inside what was tried;
- the heads family (ALPS on top heads and on random heads, which differ only in which heads train) gets one rate:
  the lowest mean dev answer loss of its two arms; LoRA gets the rate of its lowest dev answer loss;
- the dev split: 100 sentences, seed ``settings.seed + 3``.

    python -m benchmarks.demo_rates            # -> results/demo_rates.{json,md} (saves after every run)
    python -m benchmarks.demo_rates --resume   # go on from the saved JSON
    python -m benchmarks.demo_rates --quick    # the demo's quick sizes (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

GRID = (1e-4, 3e-4, 1e-3, 3e-3)
MAX_EXTENSIONS = 3
DEV_EXAMPLES = 100
FAMILIES = {"heads": ("ALPS, top heads", "ALPS, random heads"), "lora": ("LoRA",)}


def family_loss(result: dict[str, Any], family: str, lr: float) -> float | None:
    runs = [result["runs"].get(f"{arm}@{lr:g}") for arm in FAMILIES[family]]
    return None if any(r is None for r in runs) else sum(r["dev_loss"] for r in runs) / len(runs)


def next_rate(tried: list[float], losses: dict[float, float]) -> float | None:
    """The rate to try next so that the best is strictly inside the tried ones (None: it is, or the extensions ran
    out)."""
    tried = sorted(tried)
    best = min(tried, key=lambda lr: losses[lr])
    if len(tried) - len(GRID) >= MAX_EXTENSIONS:
        return None
    if best == tried[0]:
        return tried[0] / 3
    if best == tried[-1]:
        return tried[-1] * 3
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo's --quick sizes, a 2-rate grid (tests)")
    p.add_argument("--resume", action="store_true", help="go on from the saved JSON (same settings)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=C.RESULTS)
    args = p.parse_args(argv)
    from peft_alps.demo.real import RealDemoSettings

    C.quiet_transformers()
    torch.set_num_threads(args.threads)
    settings = RealDemoSettings.quick() if args.quick else RealDemoSettings()
    settings.progress = False
    stem = "demo_rates_quick" if args.quick else "demo_rates"
    path = args.out / f"{stem}.json"
    grid = GRID[1:3] if args.quick else GRID
    result = json.loads(path.read_text()) if args.resume and path.is_file() else None
    if result is not None and result["settings"] != _settings_record(settings):
        p.error(f"--resume: {path} was written with other settings; run without --resume")
    result = result or {"settings": _settings_record(settings), "grid": list(grid), "dev_examples": args_dev(args),
                        "runs": {}, "env": C.environment()}
    _tune(result, settings, grid, args, stem)
    return result


def _settings_record(settings) -> dict[str, Any]:
    keep = ("model", "ratio", "train_examples", "eval_examples", "batch_size", "warmup_steps", "warmup_lr",
            "adapter_steps", "seed")
    return {k: getattr(settings, k) for k in keep}


def _tune(result, settings, grid, args, stem: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_alps.demo import builtin_models, date_task
    from peft_alps.demo.real import ARMS, arm_model, task_model_and_heads, train_arm
    from peft_alps.demo.resources import trainable_parameters

    torch.manual_seed(settings.seed)
    folder = builtin_models.load(settings.model).resolve()
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pad = tokenizer.pad_token_id
    train = date_task.make_examples(settings.train_examples, seed=settings.seed)
    held_out = date_task.make_examples(settings.eval_examples, seed=settings.seed + 1, exclude=train)
    dev = date_task.make_examples(args_dev(args), seed=settings.seed + 3, exclude=[*train, *held_out])
    train_set, dev_set = date_task.encode(tokenizer, train), date_task.encode(tokenizer, dev)
    with tempfile.TemporaryDirectory() as tmp:
        scores, _ = task_model_and_heads(base, folder, train_set, dev_set, pad, settings, Path(tmp))
        heads_file = Path(tmp) / "heads.json"
        alps_params = None
        for family, arms in FAMILIES.items():
            tried = list(grid)
            while True:
                for lr in tried:
                    for arm in arms:
                        key = f"{arm}@{lr:g}"
                        if key not in result["runs"]:
                            torch.manual_seed(settings.seed)
                            name, model, _ = arm_model(base, arm, scores, settings, heads_file, alps_params)
                            train_arm(model, train_set, pad, settings, lr, desc=name)
                            scored = date_task.evaluate(model, dev_set, pad)
                            result["runs"][key] = {"arm": arm, "name": name, "lr": lr,
                                                   "trainable_params": trainable_parameters(model),
                                                   "dev_loss": scored["loss"], "dev_exact_match": scored["exact_match"]}
                            print(f"[demo_rates] {name} lr {lr:g}: dev loss {scored['loss']:.4f}, "
                                  f"EM {scored['exact_match']:.1%}", flush=True)
                            _save(result, stem, args.out)
                            del model
                        if arm == ARMS[0]:
                            alps_params = alps_params or result["runs"][key]["trainable_params"]
                losses = {lr: family_loss(result, family, lr) for lr in tried}
                extra = next_rate(tried, losses)
                if extra is None:
                    break
                tried.append(extra)
            best = min(tried, key=lambda lr: losses[lr])
            result.setdefault("chosen", {})[family] = {"lr": best, "tried": sorted(tried),
                                                       "inside": sorted(tried)[0] < best < sorted(tried)[-1]}
    _save(result, stem, args.out)
    print(render(result))


def args_dev(args) -> int:
    return 16 if args.quick else DEV_EXAMPLES


def _save(result, stem: str, out: Path) -> None:
    C.finish_environment(result["env"])
    C.write_outputs(out, stem, result, render(result))


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Learning rates of `peft-alps demo` ({s['model']}), tuned at its budget", "",
             f"Every arm trains as in the demo ({s['adapter_steps']} steps x {s['batch_size']} examples, the demo's "
             f"warm-up heads, seed {s['seed']}) and is scored on a dev split of {result['dev_examples']} date sentences "
             "disjoint from the demo's train and held-out sets. Heads family: one rate for ALPS on top and on random "
             "heads, the lowest mean dev answer loss of the two; LoRA: its lowest dev answer loss. Grid "
             f"{', '.join(f'{lr:g}' for lr in result['grid'])}, extended past an edge.", ""]
    rows = []
    for run in sorted(result["runs"].values(), key=lambda r: (r["arm"], r["lr"])):
        rows.append([run["name"], f"{run['lr']:g}", f"{run['trainable_params']:,}", f"{run['dev_loss']:.4f}",
                     f"{run['dev_exact_match']:.1%}"])
    lines += [C.markdown_table(["arm", "lr", "trainable params", "dev answer loss", "dev EM"], rows), ""]
    for family, chosen in result.get("chosen", {}).items():
        lines.append(f"- **{family}**: lr **{chosen['lr']:g}** (tried {', '.join(f'{lr:g}' for lr in chosen['tried'])}; "
                     f"strictly inside: {'yes' if chosen['inside'] else 'no'})")
    if "chosen" not in result or len(result["chosen"]) < len(FAMILIES):
        lines.append("- partial: not every family is tuned yet")
    lines += ["", C.produced_by(result["env"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
