"""Shared helpers for the benchmark scripts: model shapes, timing statistics, memory accounting, output files.

Nothing here is specific to one benchmark; each script stays a readable top-to-bottom story.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------ environment


def environment() -> dict[str, Any]:
    """Where and how a result was produced (stored in every JSON file)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # pragma: no cover - git missing
        commit = ""
    return {
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]]),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def finish_environment(env: dict[str, Any]) -> dict[str, Any]:
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return env


def produced_by(env: dict[str, Any], duration: str = "") -> str:
    """The provenance sentence that ends every Markdown report (``duration`` e.g. ``" in 3.2 min"``)."""
    return (f"Produced by `{env['command']}` at {env['utc']} UTC (commit {env['git_commit']}){duration}, "
            f"load average {env['loadavg_start']} -> {env['loadavg_end']}.")


# ------------------------------------------------------------------------------------------------ statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and the inter-quartile range of repeated measurements."""
    if not values:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "n": 0}
    vals = sorted(values)
    if len(vals) >= 2:
        q = statistics.quantiles(vals, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = vals[0]
    return {"median": float(statistics.median(vals)), "q1": float(q1), "q3": float(q3), "n": len(vals)}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    return {
        "mean": float(statistics.fmean(vals)) if vals else float("nan"),
        "std": float(statistics.stdev(vals)) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "values": vals,
    }


def interleaved(
    actions: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every action once per round, rotating the order each round, and return wall times per action.

    Interleaving means a burst of load from other processes hits all methods alike; the rotation removes
    any first/last-in-round bias. The first ``warmup`` rounds are run but not recorded.
    """
    names = list(actions)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            actions[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``time[name] / time[reference]`` measured in the same round."""
    return median([a / b for a, b in zip(times[name], times[reference]) if b > 0])


# ------------------------------------------------------------------------------------------------ memory


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def peak_allocation_during(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) by PyTorch's CPU allocator while ``fn`` runs, relative to its start.

    Uses the PyTorch profiler's memory events (``profile_memory=True``): every tensor allocation and free is a
    ``[memory]`` event with a signed byte count; the running sum in time order is the live-tensor growth. This
    counts tensors only (activations, gradients, optimizer states created in the step, temporaries), exactly
    and independently of the C allocator's caching, which makes it stable on a shared machine where RSS is not.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``VmHWM``; falls back to ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ output


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: Path, stem: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def publish(result: dict[str, Any], out_dir: Path, stem: str, render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """The end of every benchmark run: its JSON and its Markdown (rendered from that JSON) under ``out_dir``, the
    Markdown printed; returns ``result``."""
    markdown = render(result)
    write_outputs(out_dir, stem, result, markdown)
    print(markdown)
    return result


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def bf16_matmul_speedup(device: str = "cpu", size: int = 384, repeats: int = 3) -> float:
    """How many times faster a ``size``-square matmul runs under bf16 autocast than in float32 on ``device`` (the
    best of ``repeats`` each). Below 1 the hardware has no native bf16 matmul: a CPU without AVX512-BF16 / AMX
    falls back to a reference kernel that can be hundreds of times slower than float32."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)

    def best(bf16: bool) -> float:
        times = []
        for _ in range(repeats):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                t = time.perf_counter()
                (a @ b).sum().item()
                times.append(time.perf_counter() - t)
        return min(times)

    best(False)  # warm-up
    return best(False) / best(True)
