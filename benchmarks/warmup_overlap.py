"""Do heads localized from a cheap attention warm-up match heads localized from a full SFT task model?

The paper (Table 10) finds that a task model trained on 10% of the data, or on the attention only, gives
nearly the same ALPS results as a full SFT task model. This script checks our one-command version of that,
``peft_alps.warmup``, on the toy setup (``peft_alps.demo.synthetic``):

1. pretrain a small Llama-style base on the multi-skill corpus **without** the task skill (once, seed 0);
2. per seed: derive a **full SFT** task model (all weights, all the task's training data, several epochs) and
   **warm-up** task models (``warmup``: attention only, one pass over ``--fraction`` (default 10%) of the same
   training data; once with AdamW, once with the low-memory Adafactor); save them, localize heads of each
   against the base (W1 / PAD, qkv_product);
3. compare the head rankings: Jaccard index of the top-K sets (at several retention ratios) and Spearman rank
   correlation of the scores, next to the chance level and the full-vs-full agreement across seeds (how stable
   localization is at all at this scale);
4. train ALPS from the base, at the same budget, on the top heads of each ranking and on random heads, and
   report task token accuracy / exact match / answer loss on held-out examples, mean +- std over seeds, and the
   paired (same seed) difference to ALPS on the full-SFT heads;
5. report the warm-up checkpoint's size (attention tensors only) next to a full model checkpoint.

Run ``python benchmarks/warmup_overlap.py --quick`` (minutes on 2 CPU cores) or without ``--quick``.
Writes ``benchmarks/results/warmup_overlap.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import mean_std  # noqa: E402  (after the path setup above)

RESULTS = ROOT / "benchmarks" / "results"
RATIOS = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class Setup:
    """The toy setup of ``peft-alps demo`` (its model and training recipe): the base is pretrained on the other skills, never on the
    task skill, so the task has to be learned (and the task model's heads move for it)."""

    width: int = 128
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    pretrain_steps: int = 800
    pretrain_examples: int = 4000
    pretrain_skills: tuple[str, ...] = ("text", "copy", "arithmetic", "brackets")
    skill: str = "reverse"
    train_examples: int = 4000
    sft_steps: int = 300
    warmup_fraction: float = 0.1
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    warmup_optimizers: tuple[str, ...] = ("adamw", "adafactor")
    ratio: float = 0.25
    alps_steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    alps_lr: float = 1e-2
    eval_examples: int = 300
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = dict(width=64, layers=4, heads=8, kv_heads=4, pretrain_steps=400, pretrain_examples=2000,
             train_examples=2000, sft_steps=150, alps_steps=150, eval_examples=200)
TINY = dict(width=32, layers=2, heads=4, kv_heads=2, pretrain_steps=4, pretrain_examples=64,
            train_examples=80, sft_steps=3, warmup_batch=4, alps_steps=2, batch=8, eval_examples=8, seeds=(0, 1))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ training


def demo_settings(setup: Setup):
    """The model and training recipe of ``peft-alps demo`` (``peft_alps.demo.toy``) at this setup's sizes."""
    from peft_alps.demo.toy import DemoSettings

    return DemoSettings(hidden_size=setup.width, layers=setup.layers, heads=setup.heads, kv_heads=setup.kv_heads,
                        batch_size=setup.batch, seed=0, progress=False)


def pretrain(setup: Setup):
    """The demo's base: pretrained on ``pretrain_examples`` examples of the other skills (several epochs)."""
    from peft_alps.demo import toy as demo
    from peft_alps.demo import synthetic

    settings = demo_settings(setup)
    model = demo.build_model(settings)
    corpus = synthetic.corpus(setup.pretrain_examples, seed=0, skills=setup.pretrain_skills)
    loss = demo.train(model, corpus, setup.pretrain_steps, setup.lr, setup.batch, seed=0, loss_on="all", progress=False)
    return model, loss


def full_sft(base, examples, setup: Setup, seed: int):
    from peft_alps.demo import toy as demo

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    demo.train(model, examples, setup.sft_steps, setup.lr, setup.batch, seed=seed, progress=False)
    return model


def train_alps(base, heads, examples, setup: Setup, seed: int):
    from peft import get_peft_model

    from peft_alps import AlpsConfig
    from peft_alps.demo import toy as demo

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), AlpsConfig(target_heads=heads))
    demo.train(model, examples, setup.alps_steps, setup.alps_lr, setup.batch, seed=seed, progress=False)
    return model


# ------------------------------------------------------------------------------------------------ comparison


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def chance_jaccard(k: int, n: int) -> float:
    """Expected Jaccard index of two independent uniform k-subsets of n items (exact, hypergeometric)."""
    total = 0.0
    for i in range(max(0, 2 * k - n), k + 1):
        p = math.comb(k, i) * math.comb(n - k, k - i) / math.comb(n, k)
        total += p * i / (2 * k - i)
    return total


def pairs(selection: dict[int, list[int]]) -> list[tuple[int, int]]:
    return [(layer, head) for layer, heads in selection.items() for head in heads]


def cheap_task_models(setup: Setup) -> dict[str, dict[str, Any]]:
    """``warmup`` budgets to compare with full SFT: the warm-up (10% of the data, one pass) with each optimizer,
    and, to tell the effect of the small budget from that of training only the attention, an attention-only SFT
    with the full SFT's data, steps, lr and optimizer."""
    out = {f"warmup_{opt}": dict(fraction=setup.warmup_fraction, batch_size=setup.warmup_batch, lr=setup.warmup_lr,
                                 optimizer=opt) for opt in setup.warmup_optimizers}
    out["attn_sft"] = dict(steps=setup.sft_steps, batch_size=setup.batch, lr=setup.lr, optimizer="adamw")
    return out


LABELS = {"warmup_adamw": "warm-up (AdamW)", "warmup_adafactor": "warm-up (Adafactor)",
          "attn_sft": "attention-only SFT, full budget", "full": "full SFT", "random": "random"}


def compare(scores_a, scores_b, ratios=RATIOS) -> dict[str, Any]:
    from scipy.stats import spearmanr

    out = {"spearman": float(spearmanr(scores_a.scores.ravel(), scores_b.scores.ravel()).statistic)}
    for ratio in ratios:
        out[f"jaccard@{ratio}"] = jaccard(pairs(scores_a.top_k(ratio)), pairs(scores_b.top_k(ratio)))
    return out


# ------------------------------------------------------------------------------------------------ run


def run(setup: Setup, workdir: Path) -> dict[str, Any]:
    from peft_alps import localize_heads
    from peft_alps.demo import synthetic
    from peft_alps.scores import num_selected
    from peft_alps import warmup

    t_start = time.perf_counter()
    log(f"pretraining the base ({setup.pretrain_steps} steps)")
    base, pre_loss = pretrain(setup)
    base_dir = workdir / "base"
    base.save_pretrained(base_dir)
    full_bytes = (base_dir / "model.safetensors").stat().st_size

    train_set = synthetic.make_examples(setup.skill, setup.train_examples, seed=1000)
    eval_set = synthetic.make_examples(setup.skill, setup.eval_examples, seed=2000)
    base_eval = synthetic.evaluate(base, eval_set)
    total_heads = setup.layers * setup.heads
    k = num_selected(total_heads, setup.ratio)
    ratios = sorted({*RATIOS, setup.ratio})

    per_seed, full_scores = [], {}
    for seed in setup.seeds:
        log(f"seed {seed}: full SFT ({setup.sft_steps} steps x {setup.batch})")
        t0 = time.perf_counter()
        task = full_sft(base, train_set, setup, seed)
        sft_s = time.perf_counter() - t0
        sft_eval = synthetic.evaluate(task, eval_set)
        task.save_pretrained(workdir / f"full-{seed}")
        del task
        s_full = localize_heads(base_dir, workdir / f"full-{seed}")
        full_scores[seed] = s_full
        row = {"seed": seed, "full_sft_seconds": sft_s, "full_sft": sft_eval, "heads_full": pairs(s_full.top_k(setup.ratio))}
        selections = {"full": s_full.top_k(setup.ratio), "random": s_full.random(setup.ratio, seed=seed)}
        for name, budget in cheap_task_models(setup).items():
            log(f"seed {seed}: {name}: {budget}")
            t0 = time.perf_counter()
            warm = warmup(base, train_set, seed=seed, output_dir=workdir / f"{name}-{seed}", progress=False, **budget)
            s_warm = localize_heads(base_dir, warm)
            row[name] = {
                "seconds": time.perf_counter() - t0,
                "steps": warm.metadata["steps"],
                "examples": warm.metadata["examples_seen"],
                "loss_first": warm.metadata["loss_first"],
                "loss_last": warm.metadata["loss_last"],
                "checkpoint_bytes": warm.metadata["checkpoint_bytes"],
                "vs_full": compare(s_full, s_warm, ratios),
                "heads": pairs(s_warm.top_k(setup.ratio)),
            }
            selections[name] = s_warm.top_k(setup.ratio)
        for name, heads in selections.items():
            log(f"seed {seed}: ALPS {setup.ratio:.0%} on {name} heads")
            model = train_alps(base, heads, train_set, setup, seed)
            row[f"alps_{name}"] = synthetic.evaluate(model, eval_set)
            del model
        per_seed.append(row)
        log(f"seed {seed}: " + "; ".join(
            f"{name}: {json.dumps(row[name]['vs_full'])}" for name in cheap_task_models(setup))
            + "; token acc " + ", ".join(f"{n} {row[f'alps_{n}']['token_accuracy']:.3f}" for n in selections))

    full_vs_full = [compare(full_scores[a], full_scores[b], ratios) for a, b in itertools.combinations(setup.seeds, 2)]
    keys = ["spearman"] + [f"jaccard@{r}" for r in ratios]
    cheap = list(cheap_task_models(setup))
    names = ["full", *cheap, "random"]
    summary = {
        "warmup_vs_full": {name: {k: mean_std([r[name]["vs_full"][k] for r in per_seed]) for k in keys}
                           for name in cheap},
        "full_vs_full_across_seeds": {k: mean_std([c[k] for c in full_vs_full]) for k in keys},
        "chance": {f"jaccard@{r}": chance_jaccard(num_selected(total_heads, r), total_heads) for r in ratios}
        | {"spearman": 0.0},
        "alps": {n: {m: mean_std([r[f"alps_{n}"][m] for r in per_seed]) for m in ("token_accuracy", "accuracy", "loss")}
                 for n in names},
        # paired by seed: the same data order and initialization, only the heads differ
        "alps_token_accuracy_minus_full": {n: mean_std([r[f"alps_{n}"]["token_accuracy"] - r["alps_full"]["token_accuracy"]
                                                        for r in per_seed]) for n in names[1:]},
        "full_sft": {m: mean_std([r["full_sft"][m] for r in per_seed]) for m in ("token_accuracy", "accuracy", "loss")},
        "warmup_checkpoint_bytes": per_seed[0][cheap[0]]["checkpoint_bytes"],
        "full_checkpoint_bytes": full_bytes,
        "warmup_seconds": {name: mean_std([r[name]["seconds"] for r in per_seed]) for name in cheap},
        "warmup_steps": per_seed[0][cheap[0]]["steps"],
        "full_sft_seconds": mean_std([r["full_sft_seconds"] for r in per_seed]),
    }
    return {
        "benchmark": "warmup_overlap",
        "setup": asdict(setup),
        "k": k,
        "total_heads": total_heads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "base_eval": base_eval,
        "pretrain_loss_last": pre_loss,
        "per_seed": per_seed,
        "summary": summary,
        "seconds": time.perf_counter() - t_start,
    }


def pm(stat: dict[str, float], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(result: dict[str, Any], command: str) -> str:
    s, setup = result["summary"], result["setup"]
    n, cheap = result["total_heads"], list(s["warmup_vs_full"])
    lines = [
        f"Warm-up vs full SFT task model: toy `{setup['skill']}` task, which the base never saw (pretrained on "
        f"{', '.join(setup['pretrain_skills'])}); Llama-style base, width {setup['width']}, {setup['layers']} layers x "
        f"{setup['heads']} heads = {n} heads; seeds {list(setup['seeds'])}. Warm-up: attention only, one pass over "
        f"{setup['warmup_fraction']:.0%} of the {setup['train_examples']} training examples ({s['warmup_steps']} steps x "
        f"{setup['warmup_batch']}, lr {setup['warmup_lr']}); full SFT: all weights, {setup['sft_steps']} steps x "
        f"{setup['batch']} (lr {setup['lr']}). Command: `{command}`.",
        "",
        "| agreement with the full-SFT heads | " + " | ".join(LABELS.get(c, c) for c in cheap)
        + " | full SFT, other seed | chance |",
        "|---|" + "---:|" * (len(cheap) + 2),
    ]
    for key in s["full_vs_full_across_seeds"]:
        label = "Spearman rank correlation of scores" if key == "spearman" else (
            f"Jaccard of top-{float(key.split('@')[1]):.0%} sets")
        lines.append(f"| {label} | " + " | ".join(pm(s["warmup_vs_full"][c][key]) for c in cheap)
                     + f" | {pm(s['full_vs_full_across_seeds'][key])} | {s['chance'][key]:.3f} |")
    lines += [
        "",
        f"| ALPS {setup['ratio']:.0%} ({result['k']} heads), {setup['alps_steps']} steps, lr {setup['alps_lr']} | "
        "token accuracy | minus full-SFT heads (paired) | exact match | answer loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ["full", *cheap, "random"]:
        label = "random heads" if name == "random" else f"heads from {LABELS.get(name, name)}"
        a = s["alps"][name]
        diff = pm(s["alps_token_accuracy_minus_full"][name]) if name != "full" else "–"
        lines.append(f"| {label} | {pm(a['token_accuracy'])} | {diff} | {pm(a['accuracy'])} | {pm(a['loss'])} |")
    lines += [
        "",
        f"Base token accuracy {result['base_eval']['token_accuracy']:.3f}; full SFT task model "
        f"{pm(s['full_sft']['token_accuracy'])}. Warm-up checkpoint: {s['warmup_checkpoint_bytes'] / 1024:.1f} KiB "
        f"(attention tensors only, float32) vs {s['full_checkpoint_bytes'] / 1024:.1f} KiB for the full model; "
        + ", ".join(f"{LABELS.get(c, c)} {pm(s['warmup_seconds'][c], 1)} s" for c in cheap)
        + f" vs full SFT {pm(s['full_sft_seconds'], 1)} s.",
    ]
    return "\n".join(lines) + "\n"


def parse_overrides(setup: Setup, items: list[str]) -> dict[str, Any]:
    """``["width=256", "seeds=0,1"]`` -> typed values for :class:`Setup` fields (tuples from commas)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not hasattr(setup, name):
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(asdict(setup))}")
        current = getattr(setup, name)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            out[name] = tuple(kind(x) for x in text.split(","))
        else:
            out[name] = type(current)(text)
    return out


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small setup: minutes on 2 CPU cores")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds; for the test suite
    parser.add_argument("--skill", default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (>= 3 for the committed table)")
    parser.add_argument("--warmup-fraction", type=float, default=None, help="share of the data the warm-up sees")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override Setup fields, e.g. --set width=256 layers=6 sft_steps=600")
    parser.add_argument("--output", default=str(RESULTS / "warmup_overlap"), help="output path without suffix")
    args = parser.parse_args(argv)
    setup = Setup()
    if args.quick:
        setup = replace(setup, **QUICK)
    if args.tiny:
        setup = replace(setup, **TINY)
    if args.skill:
        setup = replace(setup, skill=args.skill)
    if args.seeds:
        setup = replace(setup, seeds=tuple(range(args.seeds)))
    if args.warmup_fraction:
        setup = replace(setup, warmup_fraction=args.warmup_fraction)
    setup = replace(setup, **parse_overrides(setup, args.set))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        result = run(setup, Path(tmp))
    command = "python benchmarks/warmup_overlap.py" + (" --quick" if args.quick else "") + (
        f" --warmup-fraction {args.warmup_fraction}" if args.warmup_fraction else "") + (
        f" --set {' '.join(args.set)}" if args.set else "")
    result["command"] = command
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))
    return result


if __name__ == "__main__":
    main()
