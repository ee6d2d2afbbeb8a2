"""A toy-scale, fully offline reproduction of the paper's Table 1 / 2 / 3 / 5 design.

1. Pretrain a small Llama-style base on the built-in multi-skill corpus (``peft_alps.demo.synthetic``: arithmetic,
   copy, reverse, brackets, text-like).
2. Derive a task model by supervised fine-tuning (all weights) on one skill (default: arithmetic).
3. Localize: ``peft_alps.localize_heads(base, task)`` with W1 (PAD), and with KL, cosine and Euclidean for
   the metric ablation.
4. From the base, at the same budget (steps, batch, schedule), train: full attention FT, w/o attn (everything
   but attention), Random 10%, LC 10% (ALPS adapters on random heads), LoRA with ALPS-10%'s parameter count
   (q/k/v/o), LoRA on q/k/v with the paper's r=128 scaled to this width (r = 128 * width / 2048), ALPS 10% and
   30%; and ALPS 10% with heads picked by the other metrics.
5. Report task accuracy (exact match on held-out examples), task loss, and the held-out answer loss on the
   other skills (forgetting: the increase over the base model), mean +- std over seeds. Seeds change the data
   order, the random head draws and LoRA's initialisation; base, task model and localization are shared.
6. Transfer: heads localized with the task model of dataset A of the skill are trained on dataset B of the
   same skill, against heads localized on B itself, random heads and full attention FT.

Hyperparameters: AdamW (0.9, 0.999), no weight decay (so full-weight methods are not shrunk), cosine schedule
to 10% with 10% warm-up, as in the paper; one learning rate for every method that trains weights or
head-sliced deltas (``--lr``) and a higher one for LoRA (``--lora-lr``), since LoRA's product parameterization
learns more slowly at the same rate. Run ``python -m benchmarks.reproduce --quick`` (a few minutes) or without
``--quick`` for the committed tables.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import _common as C
from peft_alps.demo.real import lora_rank_matching as lora_rank_for  # one rank-matching rule for demo and benchmarks
from peft_alps.demo.resources import trainable_parameters

MAIN_METHODS = ("full_attn", "wo_attn", "random_10", "lc_10", "lora_eq", "lora_qkv", "alps_10", "alps_30")
ABLATION = {"wasserstein": "alps_10", "kl": "alps_10_kl", "cosine": "alps_10_cosine", "euclidean": "alps_10_euclidean"}
LABELS = {
    "full_attn": "full attention FT",
    "wo_attn": "w/o attn (all but attention)",
    "random_10": "Random 10% heads",
    "lc_10": "LC 10% heads",
    "lora_eq": "LoRA q/k/v/o, ALPS-10% params",
    "lora_qkv": "LoRA q/k/v, paper r scaled",
    "alps_10": "ALPS 10% (W1)",
    "alps_30": "ALPS 30% (W1)",
    "alps_10_kl": "ALPS 10% (KL)",
    "alps_10_cosine": "ALPS 10% (cosine)",
    "alps_10_euclidean": "ALPS 10% (Euclidean)",
    "transfer_alps_10": "ALPS 10%, heads from dataset A",
    "transfer_indomain_alps_10": "ALPS 10%, heads from dataset B",
    "transfer_random_10": "Random 10% heads",
    "transfer_full_attn": "full attention FT",
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------------------------ setup


@dataclass(frozen=True)
class Setup:
    width: int = 64
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 256
    pretrain_steps: int = 1000
    pretrain_examples: int = 40000
    pretrain_lr: float = 3e-3
    sft_steps: int = 150
    train_steps: int = 100
    train_examples: int = 2000
    batch: int = 32
    eval_examples: int = 200
    lr: float = 1e-3
    lora_lr: float = 3e-3
    skill: str = "reverse"
    transfer_a: str = "min_len=3,max_len=8"
    transfer_b: str = "min_len=6,max_len=10"

    def config(self):
        from transformers import LlamaConfig

        from peft_alps.demo import synthetic

        return LlamaConfig(
            hidden_size=self.width, intermediate_size=self.ffn, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.width // self.heads,
            vocab_size=synthetic.VOCAB_SIZE, max_position_embeddings=64, tie_word_embeddings=False,
        )


QUICK = dict(width=64, layers=2, heads=8, kv_heads=4, ffn=128, pretrain_steps=300, pretrain_examples=8000,
             sft_steps=60, train_steps=40, train_examples=600, batch=32, eval_examples=100)


def options(text: str) -> dict[str, Any]:
    """``"digits=3,foo=1"`` -> ``{"digits": 3, "foo": 1}`` (generator options of a synthetic skill)."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, value = item.split("=", 1)
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


# ------------------------------------------------------------------------------------------------ training


def schedule(optimizer, steps: int, warmup: float = 0.1, floor: float = 0.1):
    """Linear warm-up over ``warmup * steps``, then cosine decay to ``floor`` of the peak rate (paper)."""
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model, batches, steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = schedule(optimizer, steps)
    model.train()
    losses = []
    for _, batch in zip(range(steps), batches):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def pretrain(setup: Setup, seed: int):
    from transformers import AutoModelForCausalLM

    from peft_alps.demo import synthetic

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(setup.config())
    corpus = synthetic.corpus(setup.pretrain_examples, seed=seed)
    losses = train(model, synthetic.batches(corpus, 64, seed=seed, loss_on="all"), setup.pretrain_steps, lr=setup.pretrain_lr)
    return model, losses


def sft(base, examples, setup: Setup, seed: int):
    from peft_alps.demo import synthetic

    model = copy.deepcopy(base)
    model.requires_grad_(True)
    train(model, synthetic.batches(examples, setup.batch, seed=seed), setup.sft_steps, lr=setup.lr)
    return model


# ------------------------------------------------------------------------------------------------ methods


def _is_attention(name: str) -> bool:
    return any(f".{proj}." in name for proj in ATTENTION)


def weights_method(base, train_attention: bool):
    """Plain fine-tuning of a subset of weights: attention projections only, or everything else."""
    model = copy.deepcopy(base)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_attention(name) == train_attention)
    return model


def alps_method(base, heads):
    from peft import get_peft_model

    from peft_alps import AlpsConfig

    return get_peft_model(copy.deepcopy(base), AlpsConfig(target_heads=heads))


def lora_method(base, rank: int, targets, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(base), cfg)


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(model, task_eval, other_evals: dict[str, list]) -> dict[str, Any]:
    from peft_alps.demo import synthetic

    task = synthetic.evaluate(model, task_eval)
    others = {skill: synthetic.evaluate(model, exs)["loss"] for skill, exs in other_evals.items()}
    return {"task_accuracy": task["accuracy"], "task_loss": task["loss"], "other_loss": others,
            "other_loss_mean": sum(others.values()) / max(1, len(others))}


# ------------------------------------------------------------------------------------------------ experiment


_JOBS: list[tuple[str, Callable[[int], Any], list, list, dict, float]] = []  # set before forking seed workers


def _run_seed(seed: int) -> dict[str, dict[str, Any]]:
    """Every method of the experiment for one seed (runs in a forked worker when ``--jobs > 1``)."""
    from peft_alps.demo import synthetic

    torch.set_num_threads(1)
    out: dict[str, dict[str, Any]] = {}
    for name, make, train_set, eval_set, other_evals, lr in _JOBS:
        model = make(seed)
        n_params = trainable_parameters(model)
        torch.manual_seed(seed)
        losses = train(model, synthetic.batches(train_set, _SETUP[0].batch, seed=seed), _SETUP[0].train_steps, lr)
        res = evaluate(model, eval_set, other_evals)
        res.update(seed=seed, trainable_params=n_params, final_train_loss=sum(losses[-10:]) / len(losses[-10:]))
        out[name] = res
        log(f"{name:>26} seed {seed}: acc {res['task_accuracy']:.3f}, task loss {res['task_loss']:.3f}, "
            f"other loss {res['other_loss_mean']:.3f}")
        del model
    return out


_SETUP: list[Setup] = []


def run(args) -> dict[str, Any]:
    from peft_alps import localize_heads
    from peft_alps.demo import synthetic

    setup = args.setup
    t0 = time.perf_counter()
    skill, opts_a, opts_b = setup.skill, options(setup.transfer_a), options(setup.transfer_b)
    others = [s for s in synthetic.SKILLS if s != skill]
    # data: disjoint seeds for train / task-model / eval splits
    train_a = synthetic.make_examples(skill, setup.train_examples, seed=101, **opts_a)
    sft_a = synthetic.make_examples(skill, setup.train_examples, seed=102, **opts_a)
    eval_a = synthetic.make_examples(skill, setup.eval_examples, seed=103, **opts_a)
    other_evals = {s: synthetic.make_examples(s, setup.eval_examples // 2, seed=104) for s in others}

    log(f"pretraining the base ({setup.pretrain_steps} steps)")
    base, pre_losses = pretrain(setup, seed=args.base_seed)
    base.requires_grad_(False)
    log(f"SFT task model on {skill} {setup.transfer_a} ({setup.sft_steps} steps)")
    task = sft(base, sft_a, setup, seed=args.base_seed)
    result: dict[str, Any] = {
        "setup": asdict(setup),
        "base_params": sum(p.numel() for p in base.parameters()),
        "pretrain_final_loss": sum(pre_losses[-20:]) / len(pre_losses[-20:]),
        "reference": {"base": evaluate(base, eval_a, other_evals), "task_model_sft": evaluate(task, eval_a, other_evals)},
    }
    log("localizing heads")
    scores = {m: localize_heads(base, task, metric=m) for m in ABLATION}
    total = scores["wasserstein"].total_heads
    result["selections"] = {
        m: {str(layer): heads for layer, heads in s.top_k(ratio=0.1).items()} for m, s in scores.items()
    }
    result["selections"]["wasserstein_30"] = {str(l): h for l, h in scores["wasserstein"].top_k(ratio=0.3).items()}
    result["total_heads"] = total
    if args.heatmap:
        scores["wasserstein"].heatmap(args.out / f"{args.stem}_heads.png", ratio=0.1)

    alps10_params = trainable_parameters(alps_method(base, scores["wasserstein"].top_k(ratio=0.1)))
    eq_rank = lora_rank_for(base, alps10_params, ATTENTION)
    qkv_rank = max(1, round(128 * setup.width / 2048))
    result["lora_eq_rank"], result["lora_qkv_rank"] = eq_rank, qkv_rank

    w1 = scores["wasserstein"]
    main_f: dict[str, Callable[[int], Any]] = {
        "full_attn": lambda s: weights_method(base, True),
        "wo_attn": lambda s: weights_method(base, False),
        "random_10": lambda s: alps_method(base, w1.random(ratio=0.1, seed=s)),
        "lc_10": lambda s: alps_method(base, w1.layer_consistent(ratio=0.1, seed=s)),
        "lora_eq": lambda s: lora_method(base, eq_rank, ATTENTION, s),
        "lora_qkv": lambda s: lora_method(base, qkv_rank, ATTENTION[:3], s),
        "alps_10": lambda s: alps_method(base, w1.top_k(ratio=0.1)),
        "alps_30": lambda s: alps_method(base, w1.top_k(ratio=0.3)),
    }
    for metric, name in ABLATION.items():
        if metric != "wasserstein":
            main_f[name] = (lambda sc: (lambda s: alps_method(base, sc.top_k(ratio=0.1))))(scores[metric])
    jobs = [(name, make, train_a, eval_a, other_evals, setup.lora_lr if name.startswith("lora") else setup.lr)
            for name, make in main_f.items() if not args.methods or name in args.methods]

    if args.transfer:
        log(f"transfer: dataset A = {skill} {setup.transfer_a}, dataset B = {skill} {setup.transfer_b}")
        train_b = synthetic.make_examples(skill, setup.train_examples, seed=201, **opts_b)
        sft_b = synthetic.make_examples(skill, setup.train_examples, seed=202, **opts_b)
        eval_b = synthetic.make_examples(skill, setup.eval_examples, seed=203, **opts_b)
        task_b = sft(base, sft_b, setup, seed=args.base_seed)
        scores_b = localize_heads(base, task_b, metric="wasserstein")
        sel_a, sel_b = w1.top_k(ratio=0.1), scores_b.top_k(ratio=0.1)
        overlap = sum(len(set(h) & set(sel_b.get(l, []))) for l, h in sel_a.items())
        result["transfer"] = {
            "dataset_a": setup.transfer_a, "dataset_b": setup.transfer_b,
            "heads_overlap": overlap, "heads_selected": sum(len(h) for h in sel_a.values()),
            "selection_b": {str(l): h for l, h in sel_b.items()},
            "reference": {"base": evaluate(base, eval_b, {}), "task_model_b": evaluate(task_b, eval_b, {})},
            "runs": {},
        }
        transfer_f = {
            "transfer_alps_10": lambda s: alps_method(base, sel_a),
            "transfer_indomain_alps_10": lambda s: alps_method(base, sel_b),
            "transfer_random_10": lambda s: alps_method(base, scores_b.random(ratio=0.1, seed=s)),
            "transfer_full_attn": lambda s: weights_method(base, True),
        }
        jobs += [(name, make, train_b, eval_b, {}, setup.lr) for name, make in transfer_f.items()]

    _JOBS[:] = jobs
    _SETUP[:] = [setup]
    if args.jobs > 1 and len(args.seeds) > 1:
        import multiprocessing

        log(f"{len(jobs)} methods x {len(args.seeds)} seeds in {min(args.jobs, len(args.seeds))} forked workers")
        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(args.seeds))) as pool:
            per_seed = pool.map(_run_seed, args.seeds)
    else:
        per_seed = [_run_seed(seed) for seed in args.seeds]
    runs: dict[str, list[dict[str, Any]]] = {name: [ps[name] for ps in per_seed] for name, *_ in jobs}
    result["runs"] = {k: v for k, v in runs.items() if not k.startswith("transfer_")}
    if args.transfer:
        result["transfer"]["runs"] = {k: v for k, v in runs.items() if k.startswith("transfer_")}
    result["summary"] = summarize(result)
    result["wall_s"] = time.perf_counter() - t0
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    base_other = result["reference"]["base"]["other_loss_mean"]
    out: dict[str, Any] = {}
    for name, runs in result["runs"].items():
        out[name] = {
            "trainable_params": runs[0]["trainable_params"],
            "task_accuracy": C.mean_std([r["task_accuracy"] for r in runs]),
            "task_loss": C.mean_std([r["task_loss"] for r in runs]),
            "other_loss": C.mean_std([r["other_loss_mean"] for r in runs]),
            "forgetting": C.mean_std([r["other_loss_mean"] - base_other for r in runs]),
        }
    if "transfer" in result:
        out["transfer"] = {
            name: {"trainable_params": runs[0]["trainable_params"],
                   "task_accuracy": C.mean_std([r["task_accuracy"] for r in runs]),
                   "task_loss": C.mean_std([r["task_loss"] for r in runs])}
            for name, runs in result["transfer"]["runs"].items()
        }
    return out


# ------------------------------------------------------------------------------------------------ report


def pm(stat: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def render(result: dict[str, Any], args) -> str:
    s, summ = result["setup"], result["summary"]
    ref = result["reference"]
    seeds = len(args.seeds)
    lines = [
        f"# Toy-scale reproduction ({'quick' if args.quick else 'full'} run)",
        "",
        f"Base: Llama-style, width {s['width']}, {s['layers']} layers x {s['heads']} heads ({s['kv_heads']} KV), "
        f"FFN {s['ffn']}, {result['base_params'] / 1e6:.2f}M params, pretrained {s['pretrain_steps']} steps on the "
        f"mixed synthetic corpus (final loss {result['pretrain_final_loss']:.3f}). Task skill: **{s['skill']}** "
        f"({s['transfer_a'] or 'default options'}); task model = full SFT of the base, {s['sft_steps']} steps. "
        f"Every method: {s['train_steps']} steps x batch {s['batch']} from the base, lr {s['lr']} (LoRA "
        f"{s['lora_lr']}), mean ± std over {seeds} seeds. Accuracy = exact match on {s['eval_examples']} held-out "
        f"examples; forgetting = increase of the held-out answer loss on the other skills over the base model. "
        f"LoRA equal-params r={result['lora_eq_rank']}, LoRA q/k/v r={result['lora_qkv_rank']} "
        f"(= 128 x width / 2048). {result['total_heads']} heads in all.",
        "",
        f"References: base accuracy {100 * ref['base']['task_accuracy']:.1f}%, task loss "
        f"{ref['base']['task_loss']:.3f}, other-skill loss {ref['base']['other_loss_mean']:.3f}; task model (SFT) "
        f"accuracy {100 * ref['task_model_sft']['task_accuracy']:.1f}%, other-skill loss "
        f"{ref['task_model_sft']['other_loss_mean']:.3f}.",
        "",
        "Table 1 / 5 analogue:",
        "",
    ]
    rows = []
    for name in MAIN_METHODS:
        if name in summ:
            r = summ[name]
            rows.append([LABELS[name], f"{r['trainable_params']:,}", pm(r["task_accuracy"], 100),
                         pm(r["task_loss"], 1, 3), pm(r["forgetting"], 1, 3)])
    lines.append(C.markdown_table(["method", "trainable params", "task accuracy %", "task loss",
                                   "forgetting (other-skill loss increase)"], rows))
    abl = [n for n in ABLATION.values() if n in summ]
    if abl:
        lines += ["", "Table 2 analogue (metric used to pick the 10% heads):", ""]
        lines.append(C.markdown_table(["metric", "task accuracy %", "task loss", "forgetting"], [
            [m, pm(summ[n]["task_accuracy"], 100), pm(summ[n]["task_loss"], 1, 3), pm(summ[n]["forgetting"], 1, 3)]
            for m, n in ABLATION.items() if n in summ]))
    if "transfer" in result:
        t = result["transfer"]
        lines += ["", f"Transfer (Table 3 analogue): heads localized on {s['skill']} {t['dataset_a']} (A), trained and "
                  f"evaluated on {s['skill']} {t['dataset_b']} (B). The A and B head sets share "
                  f"{t['heads_overlap']}/{t['heads_selected']} heads. Base accuracy on B "
                  f"{100 * t['reference']['base']['task_accuracy']:.1f}%, SFT-on-B task model "
                  f"{100 * t['reference']['task_model_b']['task_accuracy']:.1f}%.", ""]
        lines.append(C.markdown_table(["method", "trainable params", "accuracy on B %", "loss on B"], [
            [LABELS[n], f"{r['trainable_params']:,}", pm(r["task_accuracy"], 100), pm(r["task_loss"], 1, 3)]
            for n, r in summ["transfer"].items()]))
    lines += ["", "Selected heads (top 10%): " + "; ".join(
        f"{m}: " + " ".join(f"L{l}:{','.join(map(str, h))}" for l, h in sel.items())
        for m, sel in result["selections"].items() if m in ABLATION)]
    lines += ["", C.produced_by(result["env"], f" in {result['wall_s'] / 60:.1f} min")]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    names = [n for n in (*MAIN_METHODS, *[v for k, v in ABLATION.items() if k != "wasserstein"]) if n in summ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(names))
    colors = ["tab:red" if n.startswith("alps") else "tab:gray" for n in names]
    ax1.bar(xs, [100 * summ[n]["task_accuracy"]["mean"] for n in names],
            yerr=[100 * summ[n]["task_accuracy"]["std"] for n in names], color=colors)
    ax2.bar(xs, [summ[n]["forgetting"]["mean"] for n in names], yerr=[summ[n]["forgetting"]["std"] for n in names],
            color=colors)
    ax1.set(ylabel="task accuracy % (mean ± std)", title="task skill")
    ax2.set(ylabel="other-skill loss increase over base", title="forgetting (lower is better)")
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), [LABELS[n] for n in names], rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(message: str) -> None:
    print(f"[reproduce] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model and budgets (a few minutes on 2 cores)")
    for field, default in asdict(Setup()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=None, help=f"default {default}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    p.add_argument("--no-transfer", dest="transfer", action="store_false")
    p.add_argument("--no-heatmap", dest="heatmap", action="store_false")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="seeds run in this many forked processes (1 thread each)")
    p.add_argument("--out", type=Path, default=C.RESULTS)
    p.add_argument("--stem")
    args = p.parse_args(argv)
    values = asdict(Setup())
    if args.quick:
        values.update(QUICK)
    for field in list(values):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    args.setup = Setup(**values)
    args.stem = args.stem or ("reproduce_quick" if args.quick else "reproduce")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.quiet_transformers()
    torch.set_num_threads(args.threads)
    env = C.environment()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    result["seeds"] = args.seeds
    result["env"] = C.finish_environment(env)
    plot_path = args.out / f"{args.stem}.png"
    plot(result, plot_path)
    result["plots"] = [str(plot_path)] + ([str(args.out / f"{args.stem}_heads.png")] if args.heatmap else [])
    markdown = render(result, args)
    C.write_outputs(args.out, args.stem, result, markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
