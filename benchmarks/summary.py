"""Condense the committed benchmark results into the short "Benchmarks" section of the top-level README.

``python -m benchmarks.summary`` prints the section; ``--write-readme`` replaces the text between the
``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` markers of ``README.md`` (adding the section at the
end if the markers are missing). Only reads ``benchmarks/results/*.json``; it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import _common as C

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _load(results: Path, stem: str) -> dict[str, Any] | None:
    path = results / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def efficiency_section(data: dict[str, Any]) -> list[str]:
    from benchmarks.train_efficiency import LABELS, METHODS

    main, t = data["main"], data["targets"]
    s = main["shape"]
    lines = [
        f"**Training step** (`benchmarks/train_efficiency.py`; Llama-shaped, width {s['width']}, {s['layers']} layers, "
        f"{main['base_params'] / 1e6:.0f}M params, {main['batch']}x{main['seq']} tokens, fp32 CPU; ALPS trains "
        f"{main['selected_heads']}/{main['total_heads']} heads):",
        "",
        C.markdown_table(["method", "trainable params", "step time / ALPS", "extra peak MiB", "saved MiB"], [
            [LABELS[m], f"{main['training'][m]['trainable_params']:,}", f"{main['training'][m]['step_ratio_to_alps']:.2f}",
             C.mib(main["training"][m]["extra_peak_bytes"]), C.mib(main["training"][m]["saved_bytes"])]
            for m in METHODS
        ]),
        "",
        f"ALPS vs LoRA at equal params: step {t['alps_step_over_lora_eq']:.2f}x, extra peak memory "
        f"{t['alps_extra_peak_over_lora_eq']:.2f}x; vs the paper's masked-gradient recipe: step "
        f"{t['alps_step_over_masked']:.2f}x (target 0.9x); forward overhead unmerged "
        f"{100 * t['alps_unmerged_forward_overhead']:+.1f}%, merged {100 * t['alps_merged_forward_overhead']:+.1f}% "
        "(timing noise: merged is the base model's own modules).",
    ]
    if data.get("depth_sweep"):
        parts = [f"lowest layer {p['lowest_trained_layer']}: {1 / p['training']['masked']['step_ratio_to_alps']:.2f}x"
                 for p in data["depth_sweep"]]
        lines[-1] += " ALPS / masked step when the selected heads start higher up: " + ", ".join(parts) + "."
    return lines


def localize_section(data: dict[str, Any]) -> list[str]:
    rows = []
    for p in data["points"]:
        b = p["methods"]["baseline"]
        for kind, m in p["methods"].items():
            if kind == "baseline":
                continue
            threads = 1 if kind.startswith("ours@1") else data["args"]["threads"]
            rows.append([p["shape"]["name"], f"{kind.split(':', 1)[1]}, {threads} thread{'s' * (threads > 1)}",
                         f"{b['seconds']['median']:.1f}",
                         f"{m['seconds']['median']:.2f}", f"{m['speedup_vs_baseline']:.0f}x",
                         f"{C.mib(b['extra_peak_rss']):.0f}", f"{C.mib(m['extra_peak_rss']):.0f}",
                         f"{100 * m['extra_rss_share_of_baseline']:.0f}%"])
    return [
        "**Localization** (`benchmarks/localize_bench.py`; `localize_heads` vs the authors' algorithm: two whole "
        f"bf16 models + a per-head scipy loop, {data['args']['threads']} torch thread(s); separate processes; targets "
        ">= 50x faster, <= 10% of the extra RSS):",
        "",
        C.markdown_table(["shape", "variant", "baseline s", "ours s", "speedup", "baseline extra RSS MiB",
                          "ours extra RSS MiB", "share"], rows),
    ]


def reproduce_section(data: dict[str, Any]) -> list[str]:
    from benchmarks.reproduce import ABLATION, LABELS, MAIN_METHODS

    summ, ref = data["summary"], data["reference"]
    names = [n for n in MAIN_METHODS if n in summ] + [n for m, n in ABLATION.items() if m != "wasserstein" and n in summ]

    def pm(stat, scale=1.0, digits=1):
        return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"

    s = data["setup"]
    return [
        f"**Toy reproduction** (`benchmarks/reproduce.py`; {data['base_params'] / 1e6:.2f}M-param Llama-style base "
        f"pretrained on the synthetic skills, task = {s['skill']}, {s['train_steps']} steps per method, "
        f"{len(data['seeds'])} seeds; base accuracy {100 * ref['base']['task_accuracy']:.1f}%, SFT task model "
        f"{100 * ref['task_model_sft']['task_accuracy']:.1f}%):",
        "",
        C.markdown_table(["method", "trainable params", "task accuracy %", "forgetting (other-skill loss +)"], [
            [LABELS[n], f"{summ[n]['trainable_params']:,}", pm(summ[n]["task_accuracy"], 100),
             pm(summ[n]["forgetting"], 1, 3)] for n in names
        ]),
    ]


def section(results: Path) -> str:
    lines = [
        "## Benchmarks",
        "",
        "Measured on a shared 2-core CPU machine (noisy: only ratios from interleaved runs mean anything). How to run "
        "and read them, and the full tables and plots: [benchmarks/README.md](benchmarks/README.md).",
    ]
    for stem, render in (("train_efficiency", efficiency_section), ("localize_bench", localize_section),
                         ("reproduce", reproduce_section)):
        data = _load(results, stem)
        if data is not None:
            lines += [""] + render(data)
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in content and END in content:
        head, rest = content.split(START, 1)
        _, tail = rest.split(END, 1)
        content = head + block + tail
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    readme.write_text(content)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=C.RESULTS)
    p.add_argument("--write-readme", action="store_true", help="update the section in README.md")
    p.add_argument("--readme", type=Path, default=C.REPO / "README.md")
    args = p.parse_args(argv)
    text = section(args.results)
    if args.write_readme:
        write_readme(args.readme, text)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
