#!/usr/bin/env python
"""QLoRA / mixed / export checks of peft-alps on a GPU in bf16, plus peak CUDA memory of ALPS-on-4-bit vs QLoRA.

Runs the same checks as tests/test_quantized.py, tests/test_mixed.py and tests/test_export.py, on a CUDA device
with a bf16 compute dtype, on a randomly initialised Llama-style model built from a config (no download needed):

1. ``alps_4bit`` / ``alps_8bit``: ``prepare_model_for_kbit_training`` + gradient checkpointing, a few training
   steps (loss finite, only the ALPS deltas change), save, reload onto a fresh quantized base, same outputs.
2. ``merge_4bit``: merging into the 4-bit weights warns about rounding and leaves the untrained q rows bit-exact.
3. ``mixed``: LoRA and ALPS trained at once in one ``PeftMixedModel`` (both on q_proj): both change.
4. ``export``: ``export_to_lora`` of an ALPS adapter on the bf16 base, reloaded with plain PEFT: same outputs.
5. ``memory``: peak ``torch.cuda.max_memory_allocated`` over training steps of ALPS on a 4-bit base and of QLoRA
   (LoRA on q/k/v/o of every layer, rank chosen so that both train the same number of parameters, +- one rank
   step), same batch, sequence length and gradient checkpointing.

Results go to ``benchmarks/results/gpu_qlora_check.json`` (``--out`` to change). Without a CUDA device the script
writes ``{"skipped": ...}`` and exits 0; ``--cpu-dry-run`` instead runs every check on a tiny model on the CPU in
float32 (the memory step then records parameter counts and the matched LoRA rank, not peaks), to check the
script itself.

    python benchmarks/gpu_qlora_check.py                  # GPU, default "small" model (~0.5B parameters)
    python benchmarks/gpu_qlora_check.py --size 1b        # ~1.2B parameters
    python benchmarks/gpu_qlora_check.py --cpu-dry-run    # anywhere, tiny model, a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import peft_alps  # noqa: E402
from peft_alps import AlpsConfig, export_to_lora  # noqa: E402
from peft_alps.tuner.quantization import dequantized_weight  # noqa: E402
from peft_alps.demo.resources import trainable_parameters  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_qlora_check.json"

# name: (hidden, layers, heads, kv heads, intermediate, vocab); head_dim = hidden / heads (64 or 128)
SIZES = {
    "tiny": (64, 3, 8, 4, 128, 128),  # CPU dry run; every dim a multiple of 32/64 as bnb's CPU kernels need
    "small": (1024, 16, 16, 4, 4096, 32000),
    "1b": (2048, 16, 32, 8, 8192, 32000),
}


# ------------------------------------------------------------------------------------------------ setup


def build_base(size: str, path: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    del model
    gc.collect()
    return path


def pick_heads(size: str, ratio: float = 0.1, seed: int = 0) -> dict[int, list[int]]:
    """A fixed random 10% of all heads (localization is not what is measured here)."""
    _, layers, heads, _, _, _ = SIZES[size]
    k = max(1, math.ceil(ratio * layers * heads))
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(layers * heads, generator=g)[:k].tolist()
    out: dict[int, list[int]] = {}
    for flat in sorted(chosen):
        out.setdefault(flat // heads, []).append(flat % heads)
    return out


class Env:
    def __init__(self, device: str, dtype: torch.dtype, size: str, base: Path, steps: int, batch: int, seq: int):
        self.device, self.dtype, self.size, self.base = device, dtype, size, base
        self.steps, self.batch, self.seq = steps, batch, seq
        self.heads = pick_heads(size)

    def bnb(self, bits: str):
        from transformers import BitsAndBytesConfig

        if bits == "4bit":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype)
        return BitsAndBytesConfig(load_in_8bit=True)

    def load(self, bits: str | None = None):
        from transformers import AutoModelForCausalLM

        kw = {"dtype": self.dtype}
        if bits:
            kw["quantization_config"] = self.bnb(bits)
            kw["device_map"] = {"": self.device}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(self.base, **kw)
        return model if bits else model.to(self.device)

    def ids(self, seed: int = 1) -> torch.Tensor:
        vocab = SIZES[self.size][5]
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (self.batch, self.seq), generator=g).to(self.device)


def logits(model, x):
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(x).logits.float()


def train(model, env: Env, steps: int | None = None, lr: float = 1e-3) -> list[float]:
    x = env.ids(seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps or env.steps):
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
    model.eval()
    return losses


def free():
    """Collect garbage and return cached CUDA blocks (callers ``del`` their own references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


# ------------------------------------------------------------------------------------------------ checks


def check_alps_quantized(env: Env, bits: str, tmp: Path) -> dict:
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(env.load(bits), use_gradient_checkpointing=True)
    model = get_peft_model(model, AlpsConfig(target_heads=env.heads))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.numel() < 2**22}
    losses = train(model, env)
    check(all(math.isfinite(v) for v in losses), f"non-finite loss {losses}")
    for name, p in model.named_parameters():
        if p.requires_grad:
            check("alps_delta" in name and bool(p.abs().sum() > 0), f"{name} did not train")
        elif name in frozen:
            check(torch.equal(p, frozen[name]), f"{name} changed")
    x = env.ids()
    expected = logits(model, x)
    model.save_pretrained(tmp / f"alps_{bits}")
    del model
    free()
    fresh = PeftModel.from_pretrained(env.load(bits), tmp / f"alps_{bits}")
    diff = float((logits(fresh, x) - expected).abs().max())
    check(diff <= 1e-3 * float(expected.abs().max()) + 1e-3, f"reloaded outputs differ by {diff}")
    del fresh
    free()
    return {"losses": losses, "reload_max_abs_diff": diff}


def check_merge_4bit(env: Env) -> dict:
    import bitsandbytes as bnb
    from peft import get_peft_model

    model = get_peft_model(env.load("4bit"), AlpsConfig(target_heads=env.heads, init_weights=False))
    layer_idx = min(env.heads)
    q = model.get_base_model().model.layers[layer_idx].self_attn.q_proj
    before = dequantized_weight(q)
    rows = q.alps_index["default"].tolist()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    check(any("rounding" in str(w.message) for w in caught), "no rounding warning on a 4-bit merge")
    after_layer = merged.model.layers[layer_idx].self_attn.q_proj
    check(isinstance(after_layer, bnb.nn.Linear4bit), "merged q_proj is no longer 4-bit")
    after = dequantized_weight(after_layer)
    others = [i for i in range(before.shape[0]) if i not in set(rows)]
    check(torch.equal(after[others], before[others]), "untrained q rows changed in the 4-bit merge")
    check(not torch.equal(after[rows], before[rows]), "trained q rows did not change")
    del model, merged
    free()
    return {"trained_rows": len(rows), "untrained_rows_bit_exact": True}


def check_mixed(env: Env) -> dict:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(env.load(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), adapter_name="lora",
                           mixed=True)
    model.add_adapter("alps", AlpsConfig(target_heads=env.heads, target_modules=["q_proj", "k_proj", "o_proj"]))
    model.set_adapter(["lora", "alps"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    check(any("alps_delta" in n for n in names) and any("lora_B" in n for n in names), "an adapter is frozen")
    losses = train(model, env, steps=2)
    params = dict(model.named_parameters())
    moved = {kind: all(bool(params[n].abs().sum() > 0) for n in names if kind in n) for kind in ("alps_delta", "lora_B")}
    check(all(moved.values()), f"not every adapter trained: {moved}")
    model.set_adapter(["lora"])
    check(not any("alps_" in n for n, p in model.named_parameters() if p.requires_grad), "ALPS still trainable")
    del model
    free()
    return {"losses": losses, "trained": moved}


def check_export(env: Env, tmp: Path) -> dict:
    from peft import PeftModel, get_peft_model

    model = get_peft_model(env.load(), AlpsConfig(target_heads=env.heads, init_weights=False))
    x = env.ids()
    expected = logits(model, x)
    export_to_lora(model, tmp / "export")
    del model
    free()
    lora = PeftModel.from_pretrained(env.load(), tmp / "export")
    check(lora.peft_config["default"].peft_type == "LORA", "export is not a LoRA adapter")
    diff = float((logits(lora, x) - expected).abs().max())
    # bf16 logits: the LoRA path rounds its intermediate products differently from ALPS's index_add
    check(diff <= 2e-2 * float(expected.abs().max()) + 1e-2, f"exported LoRA differs by {diff}")
    rank = lora.peft_config["default"].r
    del lora
    free()
    return {"max_abs_diff": diff, "rank": rank}


def _peak(env: Env, build) -> dict:
    """Trainable parameters and, on a GPU, peak allocated memory and time per step while training."""
    cuda = env.device.startswith("cuda")
    free()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build()
    trainable = trainable_parameters(model)
    after_load = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    train(model, env)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / env.steps
    peak = torch.cuda.max_memory_allocated() if cuda else None
    del model
    free()
    return {"trainable_params": trainable, "peak_bytes": peak, "peak_after_load_bytes": after_load,
            "seconds_per_step": seconds}


def lora_params_per_rank(size: str) -> int:
    """Trainable parameters per unit of LoRA rank on q/k/v/o of every layer: r * (in + out) per module."""
    hidden, layers, heads, kv, _, _ = SIZES[size]
    d = hidden // heads
    return layers * ((hidden + heads * d) + 2 * (hidden + kv * d) + (heads * d + hidden))


def matching_lora_rank(trainable: int, size: str) -> int:
    """The LoRA rank whose q/k/v/o adapter trains as many parameters as ``trainable`` (nearest rank)."""
    return max(1, round(trainable / lora_params_per_rank(size)))


def measure_memory(env: Env) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    def alps():
        base = prepare_model_for_kbit_training(env.load("4bit"), use_gradient_checkpointing=True)
        return get_peft_model(base, AlpsConfig(target_heads=env.heads))

    alps_result = _peak(env, alps)
    rank = matching_lora_rank(alps_result["trainable_params"], env.size)

    def qlora():
        base = prepare_model_for_kbit_training(env.load("4bit"), use_gradient_checkpointing=True)
        return get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank,
                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))

    qlora_result = _peak(env, qlora)
    peaks = alps_result["peak_bytes"], qlora_result["peak_bytes"]
    return {
        "batch": env.batch, "seq_len": env.seq, "steps": env.steps, "gradient_checkpointing": True,
        "alps_4bit": alps_result, "qlora": {**qlora_result, "rank": rank},
        "peak_ratio_alps_over_qlora": peaks[0] / peaks[1] if None not in peaks else None,
    }


# ------------------------------------------------------------------------------------------------ main


def versions() -> dict:
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "peft_alps": peft_alps.__version__}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        out["bitsandbytes"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run(args) -> dict:
    cpu = args.cpu_dry_run
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    size = "tiny" if cpu else args.size
    results: dict = {"mode": "cpu-dry-run" if cpu else "gpu", "size": size, "dtype": str(dtype),
                     "heads": None, "versions": versions(), "checks": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = Env(device, dtype, size, build_base(size, tmp / "base", dtype), steps=args.steps,
                  batch=args.batch if not cpu else 2, seq=args.seq if not cpu else 16)
        results["heads"] = {str(k): v for k, v in env.heads.items()}
        checks = [
            ("alps_4bit", lambda: check_alps_quantized(env, "4bit", tmp)),
            ("alps_8bit", lambda: check_alps_quantized(env, "8bit", tmp)),
            ("merge_4bit", lambda: check_merge_4bit(env)),
            ("mixed", lambda: check_mixed(env)),
            ("export", lambda: check_export(env, tmp)),
        ]
        for name, fn in checks:
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            try:
                results["checks"][name] = {"ok": True, **fn()}
            except Exception as exc:  # record and go on: one failing check must not hide the others
                results["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc(limit=5)}
            results["checks"][name]["seconds"] = round(time.perf_counter() - start, 2)
            print(f"{name}: {'ok' if results['checks'][name]['ok'] else 'FAILED ' + results['checks'][name]['error']}")
        if not args.only or "memory" in args.only:
            try:
                results["memory"] = m = measure_memory(env)  # on the CPU: parameter counts only, no peaks
                mib = {k: (m[k]["peak_bytes"] or 0) / 2**20 for k in ("alps_4bit", "qlora")}
                print(f"memory: ALPS-4bit peak {mib['alps_4bit']:.0f} MiB ({m['alps_4bit']['trainable_params']:,} "
                      f"trainable) vs QLoRA r={m['qlora']['rank']} {mib['qlora']:.0f} MiB "
                      f"({m['qlora']['trainable_params']:,} trainable)" + (" [CPU: no CUDA peaks]" if cpu else ""))
            except Exception as exc:
                results["memory"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
                print(f"memory: FAILED {exc}")
        else:
            results["memory"] = {"skipped": "not requested (--only)"}
    results["ok"] = all(c["ok"] for c in results["checks"].values()) and "error" not in results["memory"]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--only", nargs="*", help="run only these checks (alps_4bit alps_8bit merge_4bit mixed "
                                                   "export memory)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model on the CPU in float32, no CUDA peaks")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    if not args.cpu_dry_run and not torch.cuda.is_available():
        results = {"skipped": "no CUDA device; run on a GPU, or pass --cpu-dry-run to check the script on the CPU",
                   "versions": versions()}
        print(results["skipped"])
        status = 0
    else:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("bitsandbytes is not installed: pip install 'peft-alps[bnb]'")
            return 1
        results = run(args)
        status = 0 if results["ok"] else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
