"""Do heads localized from a cheap attention warm-up match heads localized from a full SFT task model?

The paper (Table 10) finds that a task model trained on 10% of the data, or on the attention only, gives
nearly the same ALPS results as a full SFT task model. This script checks our one-command version of that,
``peft_alps.warmup``, on the toy setup (``peft_alps.synthetic``):

1. pretrain a small Llama-style base on the mixed multi-skill corpus (once, seed 0);
2. per seed: derive a **full SFT** task model (all weights, all the task's training data, several epochs) and a
   **warm-up** task model (``warmup``: attention only, one pass over ``--fraction`` (default 10%) of the same
   training data); save both, localize heads of each against the base (W1 / PAD, qkv_product);
3. compare the two head rankings: Jaccard index of the top-K sets (at several retention ratios) and Spearman
   rank correlation of the scores, next to the chance level and the full-vs-full agreement across seeds
   (how stable localization is at all at this scale);
4. train ALPS from the base, at the same budget, on the top-10% heads of each ranking and on random heads, and
   report task accuracy (exact match on held-out examples), mean +- std over seeds;
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

RESULTS = ROOT / "benchmarks" / "results"
RATIOS = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class Setup:
    width: int = 128
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 384
    pretrain_steps: int = 1500
    pretrain_examples: int = 40000
    skill: str = "copy"
    train_examples: int = 2000
    sft_steps: int = 400
    warmup_fraction: float = 0.1
    warmup_batch: int = 8
    warmup_lr: float = 1e-3
    alps_steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    alps_lr: float = 1e-3
    eval_examples: int = 300
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = dict(width=64, layers=4, heads=8, kv_heads=4, ffn=192, pretrain_steps=400, pretrain_examples=12800,
             train_examples=800, sft_steps=150, alps_steps=150, eval_examples=150, lr=3e-3, alps_lr=1e-2,
             warmup_lr=3e-3, warmup_batch=4)
TINY = dict(width=32, layers=2, heads=4, kv_heads=2, ffn=64, pretrain_steps=4, pretrain_examples=64,
            train_examples=40, sft_steps=3, warmup_batch=4, alps_steps=2, batch=8, eval_examples=8, seeds=(0, 1))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ training


def make_config(setup: Setup):
    from transformers import LlamaConfig

    from peft_alps import synthetic

    return LlamaConfig(
        hidden_size=setup.width, intermediate_size=setup.ffn, num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads, head_dim=setup.width // setup.heads,
        vocab_size=synthetic.VOCAB_SIZE, max_position_embeddings=64, tie_word_embeddings=False,
    )


def train(model, batches, steps: int, lr: float) -> list[float]:
    """AdamW (0.9, 0.999), no weight decay, 10% linear warm-up then cosine to 10% (the paper's recipe)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps, min_lr_rate=0.1)
    model.train()
    losses = []
    for _, batch in zip(range(steps), batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def pretrain(setup: Setup):
    from transformers import AutoModelForCausalLM

    from peft_alps import synthetic

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(setup))
    corpus = synthetic.corpus(setup.pretrain_examples, seed=0)
    losses = train(model, synthetic.batches(corpus, setup.batch, seed=0, loss_on="all"), setup.pretrain_steps, lr=3e-3)
    return model, losses


def full_sft(base, examples, setup: Setup, seed: int):
    from peft_alps import synthetic

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    train(model, synthetic.batches(examples, setup.batch, seed=seed), setup.sft_steps, lr=setup.lr)
    return model


def train_alps(base, heads, examples, setup: Setup, seed: int):
    from peft import get_peft_model

    from peft_alps import AlpsConfig, synthetic

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), AlpsConfig(target_heads=heads))
    train(model, synthetic.batches(examples, setup.batch, seed=seed), setup.alps_steps, lr=setup.alps_lr)
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


def compare(scores_a, scores_b) -> dict[str, Any]:
    from scipy.stats import spearmanr

    out = {"spearman": float(spearmanr(scores_a.scores.ravel(), scores_b.scores.ravel()).statistic)}
    for ratio in RATIOS:
        out[f"jaccard@{ratio}"] = jaccard(pairs(scores_a.top_k(ratio)), pairs(scores_b.top_k(ratio)))
    return out


def mean_std(values) -> dict[str, float]:
    import numpy as np

    values = np.asarray([float(v) for v in values])
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


# ------------------------------------------------------------------------------------------------ run


def run(setup: Setup, workdir: Path) -> dict[str, Any]:
    from peft_alps import localize_heads, synthetic
    from peft_alps.scores import num_selected
    from peft_alps.warmup import warmup

    t_start = time.perf_counter()
    log(f"pretraining the base ({setup.pretrain_steps} steps)")
    base, pre_losses = pretrain(setup)
    base_dir = workdir / "base"
    base.save_pretrained(base_dir)
    full_bytes = (base_dir / "model.safetensors").stat().st_size

    train_set = synthetic.make_examples(setup.skill, setup.train_examples, seed=1000)
    eval_set = synthetic.make_examples(setup.skill, setup.eval_examples, seed=2000)
    base_eval = synthetic.evaluate(base, eval_set)
    total_heads = setup.layers * setup.heads
    k10 = num_selected(total_heads, 0.1)

    per_seed, full_scores = [], {}
    for seed in setup.seeds:
        log(f"seed {seed}: full SFT ({setup.sft_steps} steps x {setup.batch})")
        t0 = time.perf_counter()
        task = full_sft(base, train_set, setup, seed)
        sft_s = time.perf_counter() - t0
        sft_eval = synthetic.evaluate(task, eval_set)
        task.save_pretrained(workdir / f"full-{seed}")
        del task

        log(f"seed {seed}: warm-up on {setup.warmup_fraction:.0%} of the data")
        t0 = time.perf_counter()
        warm = warmup(
            base, train_set, fraction=setup.warmup_fraction, batch_size=setup.warmup_batch, lr=setup.warmup_lr,
            seed=seed, output_dir=workdir / f"warm-{seed}", progress=False,
        )
        warm_s = time.perf_counter() - t0

        s_full = localize_heads(base_dir, workdir / f"full-{seed}")
        s_warm = localize_heads(base_dir, warm)
        full_scores[seed] = s_full
        row = {
            "seed": seed,
            "full_sft_seconds": sft_s,
            "warmup_seconds": warm_s,
            "full_sft_accuracy": sft_eval["accuracy"],
            "warmup_steps": warm.metadata["steps"],
            "warmup_examples": warm.metadata["examples_seen"],
            "warmup_loss_first": warm.metadata["loss_first"],
            "warmup_loss_last": warm.metadata["loss_last"],
            "warmup_checkpoint_bytes": warm.metadata["checkpoint_bytes"],
            "warmup_vs_full": compare(s_full, s_warm),
            "heads_full": pairs(s_full.top_k(0.1)),
            "heads_warmup": pairs(s_warm.top_k(0.1)),
        }
        random_heads = s_full.random(0.1, seed=seed)
        for name, heads in (("full", s_full.top_k(0.1)), ("warmup", s_warm.top_k(0.1)), ("random", random_heads)):
            log(f"seed {seed}: ALPS 10% on {name} heads")
            model = train_alps(base, heads, train_set, setup, seed)
            row[f"alps_{name}"] = synthetic.evaluate(model, eval_set)
            del model
        per_seed.append(row)
        log(f"seed {seed}: {json.dumps(row['warmup_vs_full'])}; acc full {row['alps_full']['accuracy']:.3f} "
            f"warm {row['alps_warmup']['accuracy']:.3f} random {row['alps_random']['accuracy']:.3f}")

    full_vs_full = [compare(full_scores[a], full_scores[b]) for a, b in itertools.combinations(setup.seeds, 2)]
    keys = ["spearman"] + [f"jaccard@{r}" for r in RATIOS]
    summary = {
        "warmup_vs_full": {k: mean_std([r["warmup_vs_full"][k] for r in per_seed]) for k in keys},
        "full_vs_full_across_seeds": {k: mean_std([c[k] for c in full_vs_full]) for k in keys},
        "chance": {f"jaccard@{r}": chance_jaccard(num_selected(total_heads, r), total_heads) for r in RATIOS}
        | {"spearman": 0.0},
        "alps_accuracy": {n: mean_std([r[f"alps_{n}"]["accuracy"] for r in per_seed]) for n in ("full", "warmup", "random")},
        "alps_loss": {n: mean_std([r[f"alps_{n}"]["loss"] for r in per_seed]) for n in ("full", "warmup", "random")},
        "full_sft_accuracy": mean_std([r["full_sft_accuracy"] for r in per_seed]),
        "warmup_checkpoint_bytes": per_seed[0]["warmup_checkpoint_bytes"],
        "full_checkpoint_bytes": full_bytes,
        "warmup_seconds": mean_std([r["warmup_seconds"] for r in per_seed]),
        "full_sft_seconds": mean_std([r["full_sft_seconds"] for r in per_seed]),
    }
    return {
        "benchmark": "warmup_overlap",
        "setup": asdict(setup),
        "k_at_0.1": k10,
        "total_heads": total_heads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "base_eval": base_eval,
        "pretrain_loss_last": pre_losses[-1],
        "per_seed": per_seed,
        "summary": summary,
        "seconds": time.perf_counter() - t_start,
    }


def pm(stat: dict[str, float], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(result: dict[str, Any], command: str) -> str:
    s, setup = result["summary"], result["setup"]
    n = result["total_heads"]
    lines = [
        f"Warm-up vs full SFT task model ({setup['skill']}; Llama-style base, width {setup['width']}, "
        f"{setup['layers']} layers x {setup['heads']} heads = {n} heads; seeds {list(setup['seeds'])}). "
        f"Warm-up: attention only, one pass over {setup['warmup_fraction']:.0%} of the "
        f"{setup['train_examples']} training examples; full SFT: all weights, {setup['sft_steps']} steps x "
        f"{setup['batch']}; peak lr: full SFT {setup['lr']}, warm-up {setup['warmup_lr']} (batch {setup['warmup_batch']}), "
        f"ALPS {setup['alps_lr']}. Command: `{command}`.",
        "",
        "| agreement of head rankings | warm-up vs full SFT | full SFT vs full SFT (other seed) | chance |",
        "|---|---:|---:|---:|",
    ]
    for key in ["spearman"] + [f"jaccard@{r}" for r in RATIOS]:
        label = "Spearman rank correlation of scores" if key == "spearman" else (
            f"Jaccard of top-{float(key.split('@')[1]):.0%} sets")
        lines.append(f"| {label} | {pm(s['warmup_vs_full'][key])} | {pm(s['full_vs_full_across_seeds'][key])} | "
                     f"{s['chance'][key]:.3f} |")
    lines += [
        "",
        f"| ALPS 10% ({result['k_at_0.1']} heads), {setup['alps_steps']} steps | task accuracy | task answer loss |",
        "|---|---:|---:|",
    ]
    for name, label in (("full", "heads from full SFT"), ("warmup", "heads from warm-up"), ("random", "random heads")):
        lines.append(f"| {label} | {pm(s['alps_accuracy'][name])} | {pm(s['alps_loss'][name])} |")
    lines += [
        "",
        f"Base accuracy {result['base_eval']['accuracy']:.3f}; full SFT task model accuracy "
        f"{pm(s['full_sft_accuracy'])}. Warm-up checkpoint: {s['warmup_checkpoint_bytes'] / 1024:.1f} KiB "
        f"(attention tensors only, float32) vs {s['full_checkpoint_bytes'] / 1024:.1f} KiB for the full model; "
        f"warm-up {pm(s['warmup_seconds'], 1)} s vs full SFT {pm(s['full_sft_seconds'], 1)} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small setup: minutes on 2 CPU cores")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds; for the test suite
    parser.add_argument("--skill", default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (>= 3 for the committed table)")
    parser.add_argument("--warmup-fraction", type=float, default=None, help="share of the data the warm-up sees")
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
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        result = run(setup, Path(tmp))
    command = "python benchmarks/warmup_overlap.py" + (" --quick" if args.quick else "") + (
        f" --warmup-fraction {args.warmup_fraction}" if args.warmup_fraction else "")
    result["command"] = command
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))
    return result


if __name__ == "__main__":
    main()
