"""Peak training memory of the attention warm-up vs full fine-tuning vs LoRA, at equal batch.

Each method runs in its own fresh process on the same Llama-shaped model (random init, float32), the same
batch and the same settings (gradient checkpointing on for every method, AdamW). The figure is the process's
peak resident memory during training minus its resident memory right after the model was built (and every
module imported), i.e. what training adds on top of holding the model: gradients, optimizer state, activations
and temporaries. Workers run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS and the
resident size follows the live tensors instead of the allocator's cache.

Methods:
  full_ft         every parameter trainable, torch AdamW
  lora_r16        PEFT LoRA r=16 on q/k/v/o, torch AdamW
  attn_plain      only the attention weights trainable, ordinary loop (all gradients kept until the step)
  warmup          peft_alps.warmup(model, ..., optimizer="adamw"): float32 deltas on attention (the model is left
                  untouched), optimizer step inside backward, so at most one attention gradient exists at a time
  warmup_inplace  the same with in_place=True: float32 weights trained directly
  warmup_inplace_8bit   ... and bitsandbytes AdamW8bit (8-bit moments)
  warmup_adafactor      optimizer="adafactor" (transformers' Adafactor without a first moment: one row and one
                  column vector per matrix) through deltas: the Python API's defaults
  warmup_inplace_adafactor   ... in place: what `peft-alps warmup` does by default

Usage:
  python benchmarks/warmup_memory.py --quick      # minutes on 2 CPU cores
  python benchmarks/warmup_memory.py              # larger model, more steps (or on a GPU machine: --device cuda)

Writes benchmarks/results/warmup_memory.json and .md. On CUDA the figure is torch.cuda.max_memory_allocated
above the model's own allocation instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("full_ft", "lora_r16", "attn_plain", "warmup", "warmup_inplace", "warmup_inplace_8bit", "warmup_adafactor",
           "warmup_inplace_adafactor")

SHAPES = {
    "quick": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=4096, batch=4, seq=128, steps=2),
    "full": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, batch=8, seq=512, steps=5),
}


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(method: str, shape: dict, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT))
    import peft_alps  # noqa: F401  (registers ALPS, provides warmup)
    from peft_alps.warmup.train import attention_modules, warmup

    # import everything any method uses before the baseline, so that module memory is not counted
    import bitsandbytes  # noqa: F401
    import tqdm.auto  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_with_min_lr_schedule_with_warmup  # noqa: F401

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    shape = dict(shape)
    batch, seq, steps = shape.pop("batch"), shape.pop("seq"), shape.pop("steps")
    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 128), tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(device)
    data = torch.randint(4, config.vocab_size, (steps * batch, seq))
    n_params = sum(p.numel() for p in model.parameters())

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _current_rss_mib()

    times = []
    if method.startswith("warmup"):
        attn = attention_modules(model)
        trainable = sum(m.weight.numel() for m in attn.values())
        t0 = time.perf_counter()
        optimizer = "adamw8bit" if method.endswith("8bit") else "adafactor" if method.endswith("adafactor") else "adamw"
        result = warmup(
            model, list(data), steps=steps, batch_size=batch, lr=1e-4, warmup_ratio=0.0, optimizer=optimizer,
            in_place="inplace" in method, progress=False,
        )
        times = [(time.perf_counter() - t0) / steps]
        if optimizer == "adafactor":  # one float32 row and column vector per weight matrix
            state_bytes = sum(4 * sum(m.weight.shape) for m in attn.values())
        else:  # two moments, 1 or 4 bytes each
            state_bytes = trainable * (2 if optimizer == "adamw8bit" else 8)
        extra = {"checkpoint_tensor_mib": result.nbytes / 2**20}
    else:
        if method == "lora_r16":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        elif method == "attn_plain":
            model.requires_grad_(False)
            for module in attention_modules(model).values():
                module.weight.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for step in range(steps):
            t0 = time.perf_counter()
            x = data[step * batch : (step + 1) * batch].to(device)
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
        extra = {}

    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_peak_mib()
    return {
        "method": method,
        "params": n_params,
        "trainable_params": trainable,
        "optimizer_state_mib": state_bytes / 2**20,
        "extra_peak_mib": peak - baseline,
        "step_s_median": statistics.median(times),
        **extra,
    }


def run(mode: str, device: str, methods=METHODS, repeats: int = 1) -> dict:
    shape = SHAPES[mode]
    rows = []
    for method in methods:
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", method, "--shape", json.dumps(shape), "--device", device],
                capture_output=True, text=True, check=True,
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["extra_peak_mib"])  # least disturbed by other processes
        rows.append(best)
        print(f"{method:20s} extra peak {best['extra_peak_mib']:8.1f} MiB   step {best['step_s_median']:.2f}s", flush=True)
    return {
        "benchmark": "warmup_memory",
        "mode": mode,
        "device": device,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "measure": "peak RSS minus RSS after model build" if device == "cpu" else "max_memory_allocated minus model",
        "shape": shape,
        "command": f"python benchmarks/warmup_memory.py {'--quick' if mode == 'quick' else ''}".strip(),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    s = result["shape"]
    by = {r["method"]: r for r in result["rows"]}
    lines = [
        f"Warm-up memory ({result['mode']}, {result['device']}): Llama-shaped, hidden {s['hidden_size']}, "
        f"{s['num_hidden_layers']} layers, vocab {s['vocab_size']}, batch {s['batch']} x {s['seq']} tokens, "
        f"gradient checkpointing on for all; AdamW unless the method says otherwise. Extra peak = {result['measure']}. "
        f"Command: `{result['command']}`.",
        "",
        "| method | trainable params | optimizer state (MiB) | extra peak memory (MiB) | vs full FT | vs LoRA r=16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    defaults = {"warmup_adafactor": " (API default)", "warmup_inplace_adafactor": " (CLI default)"}
    for r in result["rows"]:
        ratios = [
            f"{r['extra_peak_mib'] / by[ref]['extra_peak_mib']:.2f}x" if ref in by else "-"
            for ref in ("full_ft", "lora_r16")
        ]
        lines.append(
            f"| {r['method']}{defaults.get(r['method'], '')} | {r['trainable_params']:,} | {r['optimizer_state_mib']:.1f} | "
            f"{r['extra_peak_mib']:.1f} | {ratios[0]} | {ratios[1]} |"
        )
    lines += ["", "Step times are in the JSON; on a shared CPU machine they measure the neighbours more than the method."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="runs per method, the lowest kept")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "warmup_memory"))
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the saved .json only")
    args = parser.parse_args(argv)
    if args.render:
        out = Path(args.output)
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.shape), args.device)))
        return
    mode = "quick" if args.quick else "full"
    result = run(mode, args.device, repeats=args.repeats or (1 if args.quick else 2))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
