"""Head localization: ``peft_alps.localize_heads`` against the authors' algorithm, on growing model shapes.

The baseline restates the algorithm of the authors' released scoring script (VoiceBeer/ALPS): load the base
and the task model whole with ``AutoModel.from_pretrained(dtype=bfloat16)``, cut every query head's q, k and v
slices out of both models and keep them (flattened and concatenated) in a dict per model, then loop over the
heads: float32 softmax of each vector, ``scipy.stats.wasserstein_distance`` on the unit support. The one
deliberate change: k/v slices are taken from the head's KV group ``h // (n / g)``, as in ``peft_alps`` (the
released script mis-slices them for GQA models), so both sides compute the same ``qkv_concat`` score.

Every measurement is its own fresh process: an import-only process (the same imports, nothing run) gives the
reference peak RSS; "extra peak RSS" of a method is its process's peak RSS (``VmHWM``) minus that reference.
Time is wall time of the call alone, after the imports. Checkpoints are random-weight Llama models built
from configs and saved as safetensors; the task model is the base plus noise, with a few heads perturbed
harder. ``intermediate_size`` and ``vocab_size`` are kept small by default: that makes the checkpoints (and
the baseline's whole-model load) smaller than a real model of the same attention shape, which favours the
baseline in both time and memory.

Run ``python -m benchmarks.localize_bench --quick`` (minutes) or without ``--quick`` for the committed figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import _common as C
from benchmarks.checkpoint_pairs import PairShape, build_pair, parse_shape

# ------------------------------------------------------------------------------------------------ shapes


QUICK_SHAPES = [
    PairShape("2L x 4H x 128", 2, 4, 128, 2),
    PairShape("8L x 16H x 1024 (bf16 target)", 8, 16, 1024, 4),
]
FULL_SHAPES = [
    PairShape("4L x 8H x 512", 4, 8, 512, 2),
    PairShape("8L x 16H x 1024 (bf16 target)", 8, 16, 1024, 4),
    PairShape("16L x 32H x 2048 (~1B-shaped target)", 16, 32, 2048, 8),
]


# ------------------------------------------------------------------------------------------------ the two methods


def authors_algorithm(base_dir: str, task_dir: str) -> list[list[float]]:
    """Both models loaded whole, every head's q/k/v kept, then a per-head scipy W1 loop (see module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from scipy.stats import wasserstein_distance
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(base_dir)
    base = AutoModel.from_pretrained(base_dir, dtype=torch.bfloat16)
    task = AutoModel.from_pretrained(task_dir, dtype=torch.bfloat16)
    n, g = config.num_attention_heads, config.num_key_value_heads
    layers = config.num_hidden_layers

    def per_head_vectors(model) -> dict[tuple[int, int], torch.Tensor]:
        vectors = {}
        for layer in range(layers):
            attn = model.layers[layer].self_attn
            q, k, v = attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data
            dh = q.shape[0] // n
            for h in range(n):
                kv = h // (n // g)
                parts = (q[h * dh : (h + 1) * dh], k[kv * dh : (kv + 1) * dh], v[kv * dh : (kv + 1) * dh])
                vectors[(layer, h)] = torch.cat([p.flatten() for p in parts])
        return vectors

    base_vectors, task_vectors = per_head_vectors(base), per_head_vectors(task)
    scores = [[0.0] * n for _ in range(layers)]
    for (layer, h), vb in base_vectors.items():
        pb = F.softmax(vb.float(), dim=0).numpy()
        pt = F.softmax(task_vectors[(layer, h)].float(), dim=0).numpy()
        support = np.linspace(0, 1, len(pb))
        scores[layer][h] = float(wasserstein_distance(support, support, pb, pt))
    return scores


def ours(base_dir: str, task_dir: str, variant: str) -> list[list[float]]:
    from peft_alps import localize_heads

    result = localize_heads(base_dir, task_dir, metric="wasserstein", variant=variant, tau=1.0)
    return result.scores.tolist()


# ------------------------------------------------------------------------------------------------ worker process


def _imports() -> None:
    """What every worker imports, so the import-only process is a fair reference."""
    import numpy  # noqa: F401
    import scipy.stats  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModel  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    try:
        import peft_alps  # noqa: F401
        from peft_alps import localize_heads  # noqa: F401
    except ImportError:
        pass


def worker(args: argparse.Namespace) -> None:
    C.quiet_transformers()
    _imports()
    import torch

    torch.set_num_threads(args.threads)
    rss_before = C.rss_bytes()
    start = time.perf_counter()
    scores = None
    if args.worker == "baseline":
        scores = authors_algorithm(args.base, args.task)
    elif args.worker.startswith("ours"):
        scores = ours(args.base, args.task, args.worker.split(":", 1)[1])
    elapsed = time.perf_counter() - start
    out = {"seconds": elapsed, "peak_rss": C.peak_rss_bytes(), "rss_after_imports": rss_before, "scores": scores}
    Path(args.result).write_text(json.dumps(out))


def run_worker(kind: str, base: Path, task: Path, threads: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = Path(fh.name)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "benchmarks.localize_bench", "--worker", kind, "--base", str(base),
           "--task", str(task), "--result", str(result), "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(result.read_text())
    result.unlink()
    return data


def have_localize_heads() -> bool:
    try:
        from peft_alps import localize_heads  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ one shape


def measure_shape(shape: PairShape, root: Path, args) -> dict[str, Any]:
    base, task = build_pair(shape, root, seed=args.seed)
    ckpt_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    kinds = ["import"] + [f"ours:{v}" for v in args.variants if args.ours] + ["baseline"]
    if args.ours and args.threads > 1:  # ours on one thread too, next to the others (not a target row)
        kinds[-1:-1] = [f"ours@1:{v}" for v in args.variants]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(args.reps):  # interleaved repetitions: a load burst hits every method alike
        for kind in kinds:
            if kind == "baseline" and rep >= args.baseline_reps:
                continue
            runs[kind].append(run_worker(kind, base, task, 1 if kind.startswith("ours@1") else args.threads))
    ref_rss = C.median([r["peak_rss"] for r in runs["import"]])
    point: dict[str, Any] = {
        "shape": {**asdict(shape), "head_dim": shape.head_dim, "attention_params": shape.attention_params},
        "checkpoint_bytes": ckpt_bytes,
        "import_peak_rss": ref_rss,
        "methods": {},
    }
    for kind in kinds[1:]:
        point["methods"][kind] = {
            "seconds": C.spread([r["seconds"] for r in runs[kind]]),
            "extra_peak_rss": C.median([r["peak_rss"] - ref_rss for r in runs[kind]]),
        }
    b = point["methods"]["baseline"]
    for kind in kinds[1:-1]:
        m = point["methods"][kind]
        m["speedup_vs_baseline"] = b["seconds"]["median"] / m["seconds"]["median"]
        m["extra_rss_share_of_baseline"] = m["extra_peak_rss"] / b["extra_peak_rss"] if b["extra_peak_rss"] > 0 else float("nan")
    if "ours:qkv_concat" in runs:  # the same score on both sides: check that they agree
        import numpy as np

        ref = np.array(runs["baseline"][0]["scores"])
        got = np.array(runs["ours:qkv_concat"][0]["scores"])
        point["agreement"] = {
            "max_rel_diff": float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30))),
            "same_top10pct": _top(ref, 0.1) == _top(got, 0.1),
        }
    return point


def _top(scores, ratio: float) -> list[tuple[int, int]]:
    import numpy as np

    flat = np.asarray(scores).ravel()
    k = math.ceil(ratio * flat.size)
    idx = np.argsort(-flat, kind="stable")[:k]
    return sorted((int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in idx)


# ------------------------------------------------------------------------------------------------ report


def render(result: dict[str, Any]) -> str:
    lines = [f"# Head localization ({'quick' if result['quick'] else 'full'} run)", ""]
    lines.append(
        "Baseline: the authors' algorithm (two whole bf16 models via `AutoModel.from_pretrained`, every head's "
        "q/k/v slices kept, per-head float32 softmax + `scipy.stats.wasserstein_distance`). Ours: "
        "`peft_alps.localize_heads` streaming the safetensors checkpoints. Each figure is a fresh process; extra "
        f"peak RSS is over an import-only process. Medians of {result['args']['reps']} runs "
        f"({result['args']['baseline_reps']} for the baseline), {result['args']['threads']} torch thread(s)."
    )
    lines.append("")
    rows = []
    for p in result["points"]:
        s, b = p["shape"], p["methods"]["baseline"]
        row = [s["name"], s["dtype"], f"{s['attention_params'] / 1e6:.1f}M", f"{C.mib(p['checkpoint_bytes']):.0f}",
               b["seconds"]["median"], C.mib(b["extra_peak_rss"])]
        for variant in result["args"]["variants"]:
            m = p["methods"].get(f"ours:{variant}")
            if m is None:
                row += ["–"] * 4
                continue
            row += [m["seconds"]["median"], C.mib(m["extra_peak_rss"]), f"{m['speedup_vs_baseline']:.0f}x",
                    f"{100 * m['extra_rss_share_of_baseline']:.1f}%"]
        rows.append(row)
    headers = ["shape", "dtype", "attn params", "ckpt MiB", "baseline s", "baseline extra RSS MiB"]
    for variant in result["args"]["variants"]:
        headers += [f"{variant} s", f"{variant} extra RSS MiB", f"{variant} speedup", f"{variant} RSS share"]
    lines.append(C.markdown_table(headers, rows))
    single = [(p["shape"]["name"], v, p["methods"][f"ours@1:{v}"]) for p in result["points"]
              for v in result["args"]["variants"] if f"ours@1:{v}" in p["methods"]]
    if single:
        lines += ["", "Ours on one torch thread, same runs (the baseline above used "
                  f"{result['args']['threads']}): " + "; ".join(
                      f"{name} {v}: {m['seconds']['median']:.2f} s ({m['speedup_vs_baseline']:.0f}x), "
                      f"{C.mib(m['extra_peak_rss']):.1f} MiB" for name, v, m in single) + "."]
    agreements = [(p["shape"]["name"], p["agreement"]) for p in result["points"] if "agreement" in p]
    if agreements:
        lines += ["", "Same score on both sides (`qkv_concat`): " + "; ".join(
            f"{name}: max rel. diff {a['max_rel_diff']:.1e}, same top-10% heads: {a['same_top10pct']}"
            for name, a in agreements) + " (the baseline softmaxes in float32, ours accumulates in float64)."]
    if result.get("targets"):
        lines += ["", "Targets (issue 3): >= 50x faster, extra peak RSS <= 10% of the baseline's", ""]
        lines.append(C.markdown_table(["shape", "variant", "speedup", "RSS share", "met"], [
            [t["shape"], t["variant"], f"{t['speedup']:.0f}x", f"{100 * t['rss_share']:.1f}%", t["met"]]
            for t in result["targets"]
        ]))
    if not result.get("ours_available"):
        lines += ["", "**`peft_alps.localize_heads` was not importable in this run: only the baseline was measured.**"]
    lines += ["", C.produced_by(result["env"])]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    xs = [p["shape"]["attention_params"] / 1e6 for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = ["baseline"] + [f"ours:{v}" for v in result["args"]["variants"] if result.get("ours_available")]
    for kind in kinds:
        ax1.plot(xs, [p["methods"][kind]["seconds"]["median"] for p in points], marker="o", label=kind)
        ax2.plot(xs, [max(C.mib(p["methods"][kind]["extra_peak_rss"]), 0.1) for p in points], marker="o", label=kind)
    ax1.set(xlabel="attention parameters (M)", ylabel="seconds", title="localization time")
    ax2.set(xlabel="attention parameters (M)", ylabel="extra peak RSS (MiB)", title="localization memory")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def torch_default_threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes (up to 8L x 16H x 1024), fewer repetitions")
    p.add_argument("--shapes", nargs="*", help="custom shapes LxHxD[:kv[:dtype]], e.g. 2x4x64:2:float32")
    p.add_argument("--reps", type=int, help="runs per method and shape (interleaved)")
    p.add_argument("--baseline-reps", type=int, help="runs of the (slow) baseline per shape")
    p.add_argument("--variants", nargs="*", default=["qkv_concat", "qkv_product"])
    p.add_argument("--no-ours", dest="ours", action="store_false", help="measure the baseline only")
    p.add_argument("--threads", type=int, default=torch_default_threads(),
                   help="torch threads for every method (default: torch's default, the machine's cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=C.RESULTS)
    p.add_argument("--stem")
    p.add_argument("--remote", action="store_true", help="measure the remote row instead (Hub repos over a throttled "
                   "link, ranged reads vs whole shards; benchmarks/localize_remote.py, which has more options)")
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps is None:  # every run is a fresh process (~10 s of imports alone on a loaded 2-core box)
        args.reps = 1 if args.quick else 2
    if args.baseline_reps is None:
        args.baseline_reps = 1
    args.stem = args.stem or ("localize_bench_quick" if args.quick else "localize_bench")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.remote:
        from benchmarks import localize_remote

        return localize_remote.main(["--reps", str(1 if args.quick else 2), "--out", str(args.out)]
                                    + (["--workdir", str(args.workdir)] if args.workdir else []))
    C.quiet_transformers()
    env = C.environment()
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.ours = args.ours and have_localize_heads()
    result: dict[str, Any] = {"quick": args.quick, "ours_available": args.ours,
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                       if k not in ("worker", "base", "task", "result")}}
    result["points"] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        for i, shape in enumerate(shapes):
            print(f"[localize_bench] {shape.name} ({shape.dtype})", flush=True)
            result["points"].append(measure_shape(shape, root / f"pair{i}_{shape.layers}x{shape.heads}x{shape.hidden}_{shape.dtype}", args))
    result["targets"] = []
    for p in result["points"]:
        for kind, m in p["methods"].items():
            if kind == "baseline" or kind.startswith("ours@1"):
                continue
            result["targets"].append({
                "shape": p["shape"]["name"], "variant": kind.split(":", 1)[1], "speedup": m["speedup_vs_baseline"],
                "rss_share": m["extra_rss_share_of_baseline"],
                "met": m["speedup_vs_baseline"] >= 50 and m["extra_rss_share_of_baseline"] <= 0.10,
            })
    result["env"] = C.finish_environment(env)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / f"{args.stem}.png"
    plot(result, plot_path)
    result["plots"] = [str(plot_path)]
    return C.publish(result, args.out, args.stem, render)


if __name__ == "__main__":
    main(sys.argv[1:])
