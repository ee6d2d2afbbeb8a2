"""Training and inference efficiency of ALPS against the alternatives, side by side in one process.

Methods (same Llama-shaped model, same weights, same batch, same AdamW):

``alps``        ALPS adapter on 10% of the heads (q/k/v/o slices), the package under test;
``lora_eq``     LoRA on q/k/v/o with the rank that gives the same trainable-parameter count as ``alps``;
``lora_qkv``    the paper's LoRA baseline, LoRA on q/k/v with r = 128 * width / 2048 (the paper's r=128 on
                Llama-3.2-1B, whose width is 2048, scaled to this model's width; ``--lora-qkv-rank`` overrides);
``masked``      the paper's own recipe: every q/k/v/o weight has ``requires_grad=True`` and a
                post-accumulate-grad hook zeroes the rows/columns of non-selected heads, so the update space is
                the same as ``alps``;
``full``        full fine-tuning.

Per method: step time (forward + backward + AdamW step + zero_grad; median over interleaved rounds, plus
the median of per-round ratios to ``alps``), peak training memory (see ``_common.peak_allocation_during``:
live tensor bytes counted from the PyTorch profiler's allocation events, plus parameters, buffers and
optimizer states resident at the start of the step), trainable parameters, optimizer-state bytes, file size
of what must be saved, forward latency unmerged / merged against the base model. Then the same step-time
and memory figures over growing sequence length and model width.

Run ``python -m benchmarks.train_efficiency --quick`` (a couple of minutes on 2 CPU cores) or without
``--quick`` for the committed figures. ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from peft_alps.demo.real import lora_rank_matching  # one rank-matching rule for demo and benchmarks
from peft_alps.demo.resources import trainable_parameters

METHODS = ("alps", "lora_eq", "lora_qkv", "masked", "full")
LABELS = {
    "alps": "ALPS 10% heads",
    "lora_eq": "LoRA q/k/v/o, equal params",
    "lora_qkv": "LoRA q/k/v, paper r (scaled)",
    "masked": "paper recipe (masked grads)",
    "full": "full fine-tuning",
}


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder. Heads are ``width / head_dim``; KV heads a quarter of them (GQA as in Llama-3)."""

    width: int = 512
    layers: int = 8
    head_dim: int = 64
    kv_ratio: int = 4
    ffn_mult: int = 4  # Llama-3.2-1B: 8192 / 2048
    vocab: int = 16384  # embedding share of the parameters close to Llama-3.2-1B's (~0.27)

    @property
    def heads(self) -> int:
        return max(1, self.width // self.head_dim)

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // self.kv_ratio)

    def config(self):
        from transformers import LlamaConfig

        if self.width % self.head_dim:
            raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} heads cannot be split in {self.kv_heads} KV groups")
        return LlamaConfig(
            hidden_size=self.width,
            intermediate_size=self.ffn_mult * self.width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )


def build_base(shape: Shape, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.config(), attn_implementation="sdpa")
    return model.float()


def select_heads(shape: Shape, ratio: float, seed: int, min_layer: int = 0) -> dict[int, list[int]]:
    """``ceil(ratio * heads)`` heads drawn at random over all layers (a localization result of the same size).

    Cost depends on how many heads are trained and on the lowest trained layer, not on which heads scored
    best, so a seeded random draw stands in for a real localization here. ``min_layer`` restricts the draw
    to layers ``>= min_layer`` (same count), to show what stopping autograd early is worth.
    """
    k = max(1, math.ceil(round(ratio * shape.layers * shape.heads, 9)))
    pairs = [(layer, head) for layer in range(min_layer, shape.layers) for head in range(shape.heads)]
    if k > len(pairs):
        raise ValueError(f"{k} heads do not fit in layers {min_layer}..{shape.layers - 1}")
    chosen = random.Random(seed).sample(pairs, k)
    if min_layer and min(layer for layer, _ in chosen) != min_layer:  # pin the lowest trained layer exactly
        chosen[0] = (min_layer, chosen[0][1])
    heads: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        heads.setdefault(layer, []).append(head)
    return heads


# ------------------------------------------------------------------------------------------------ methods


def make_alps(base, heads):
    import peft_alps  # noqa: F401  (registers ALPS with PEFT)
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(base), peft_alps.AlpsConfig(target_heads=heads))


def make_lora(base, rank: int, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # B starts at zero; give it values so that merge/unmerge does real work
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return model


def make_masked(base, heads):
    """The paper's recipe: all attention weights trainable, non-selected heads' gradient rows/columns zeroed.

    The mask is applied once per step in a post-accumulate-grad hook with ``index_fill_`` on the complement
    of the selected slices (cheaper than multiplying by a dense mask). Weight decay is 0 in this benchmark, so
    AdamW leaves the masked entries exactly unchanged and the update space equals ALPS's.
    """
    from peft_alps.layouts import head_slice, layout_for_config

    model = copy.deepcopy(base)
    model.requires_grad_(False)
    layout, dims = layout_for_config(model.config)
    for name, module in model.named_modules():
        found = layout.match(name)
        if found is None or not isinstance(module, torch.nn.Linear):
            continue
        layer, projection = found
        weight = module.weight
        weight.requires_grad_(True)
        axis, keep = head_slice(projection.role, dims, heads.get(layer, []))
        dim = 0 if axis == "out" else 1
        keep_set = set(keep)
        drop = torch.tensor([i for i in range(weight.shape[dim]) if i not in keep_set], dtype=torch.long)

        def hook(param, dim=dim, drop=drop):
            if param.grad is not None and drop.numel():
                param.grad.index_fill_(dim, drop, 0.0)

        weight.register_post_accumulate_grad_hook(hook)
    return model


def make_full(base):
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    return model


def build_methods(base, shape: Shape, heads, qkv_rank: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    models: dict[str, Any] = {}
    info: dict[str, Any] = {}
    models["alps"] = make_alps(base, heads)
    alps_params = trainable_parameters(models["alps"])
    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    eq_rank = lora_rank_matching(base, alps_params, qkvo)
    models["lora_eq"] = make_lora(base, eq_rank, qkvo)
    qkv_rank = qkv_rank or max(1, round(128 * shape.width / 2048))
    models["lora_qkv"] = make_lora(base, qkv_rank, ["q_proj", "k_proj", "v_proj"])
    models["masked"] = make_masked(base, heads)
    models["full"] = make_full(base)
    info["lora_eq_rank"] = eq_rank
    info["lora_qkv_rank"] = qkv_rank
    info["selected_heads"] = sum(len(h) for h in heads.values())
    info["total_heads"] = shape.layers * shape.heads
    info["lowest_trained_layer"] = min(heads)
    return models, info


def effective_trainable(name: str, model, alps_params: int) -> int:
    """Entries the method can actually change (for ``masked`` the selected slices, i.e. ALPS's count)."""
    return alps_params if name == "masked" else trainable_parameters(model)


# ------------------------------------------------------------------------------------------------ steps


class Trainer:
    """One model + AdamW; ``step()`` is forward + backward + optimizer step + zero_grad on a fixed batch."""

    def __init__(self, model, batch: torch.Tensor, lr: float = 1e-4):
        self.model = model.train()
        self.batch = batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def step(self) -> float:
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def resident_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        grads = [p.grad for p in self.params if p.grad is not None]
        opt = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return C.tensor_bytes(tensors + grads + opt)


def measure_training(models: dict[str, Any], batch, rounds: int, warmup: int, base_bytes: int) -> dict[str, Any]:
    trainers = {name: Trainer(model, batch) for name, model in models.items()}
    times = C.interleaved({name: t.step for name, t in trainers.items()}, rounds=rounds, warmup=warmup)
    out: dict[str, Any] = {}
    for name, trainer in trainers.items():
        resident = trainer.resident_bytes()
        transient = C.peak_allocation_during(trainer.step)
        out[name] = {
            "step_s": C.spread(times[name]),
            "step_ratio_to_alps": C.paired_ratio(times, name, "alps"),
            "trainable_params": trainable_parameters(trainer.model),
            "optimizer_state_bytes": C.optimizer_state_bytes(trainer.optimizer),
            "resident_bytes": resident,
            "step_transient_peak_bytes": transient,
            "peak_bytes": resident + transient,
            "extra_peak_bytes": resident + transient - base_bytes,
        }
    for trainer in trainers.values():
        trainer.optimizer.state.clear()
    return out


# ------------------------------------------------------------------------------------------------ saving


def saved_bytes(name: str, model) -> int:
    """Bytes on disk of what a user must keep to reproduce the trained model from the base."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if name in ("alps", "lora_eq", "lora_qkv"):
            model.save_pretrained(tmp)
            return (Path(tmp) / "adapter_model.safetensors").stat().st_size
        if name == "masked":  # the recipe updates whole attention matrices in place: they are what changed
            tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        else:
            tensors = {n: p.detach().contiguous() for n, p in model.state_dict().items()}
        save_file(tensors, str(Path(tmp) / "model.safetensors"))
        return (Path(tmp) / "model.safetensors").stat().st_size


# ------------------------------------------------------------------------------------------------ inference


def measure_forward(base, models: dict[str, Any], batch, rounds: int) -> dict[str, Any]:
    """Forward latency (eval, no grad) of base vs adapters unmerged, merged in the wrapper, and merged+unloaded."""
    variants: dict[str, Any] = {"base": base.eval()}
    for name in ("alps", "lora_eq", "lora_qkv"):
        peft_model = models[name].eval()
        variants[f"{name}/unmerged"] = peft_model
        unloaded = copy.deepcopy(peft_model).merge_and_unload().eval()
        variants[f"{name}/merged"] = unloaded
        wrapped = copy.deepcopy(peft_model)
        wrapped.merge_adapter()
        variants[f"{name}/merged_in_wrapper"] = wrapped.eval()

    def forward(model):
        def run():
            with torch.inference_mode():
                model(input_ids=batch)

        return run

    times = C.interleaved({k: forward(m) for k, m in variants.items()}, rounds=rounds, warmup=1)
    return {
        key: {"forward_s": C.spread(times[key]), "overhead_vs_base": C.paired_ratio(times, key, "base") - 1.0}
        for key in variants
    }


# ------------------------------------------------------------------------------------------------ one config


def run_point(shape: Shape, batch_size: int, seq: int, rounds: int, warmup: int, args, full: bool,
              min_layer: int = 0) -> dict[str, Any]:
    base = build_base(shape, seed=args.seed)
    base.requires_grad_(False)
    heads = select_heads(shape, args.ratio, args.seed, min_layer=min_layer)
    models, info = build_methods(base, shape, heads, args.lora_qkv_rank)
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, shape.vocab, (batch_size, seq), generator=gen)
    base_bytes = C.tensor_bytes(list(base.parameters()) + list(base.buffers()))
    point: dict[str, Any] = {
        "shape": {**asdict(shape), "heads": shape.heads, "kv_heads": shape.kv_heads},
        "batch": batch_size,
        "seq": seq,
        "base_params": sum(p.numel() for p in base.parameters()),
        "base_bytes": base_bytes,
        **info,
    }
    point["training"] = measure_training(models, batch, rounds, warmup, base_bytes)
    alps_params = point["training"]["alps"]["trainable_params"]
    for name, model in models.items():
        point["training"][name]["effective_trainable_params"] = effective_trainable(name, model, alps_params)
    if full:
        for name, model in models.items():
            point["training"][name]["saved_bytes"] = saved_bytes(name, model)
        point["forward"] = measure_forward(base, models, batch, rounds=args.forward_rounds)
    return point


# ------------------------------------------------------------------------------------------------ report


def flop_bound(point: dict[str, Any]) -> dict[str, float]:
    """Matmul FLOPs of one step, to explain the ALPS / masked-recipe ratio independently of timing noise.

    Both methods run the same forward and the same input-gradient backward down to the lowest layer with
    trainable weights (ALPS: its lowest selected layer; masked recipe: layer 0, since every attention weight
    requires grad). The recipe adds the weight-gradient GEMMs of all q/k/v/o weights (2 * tokens * params);
    ALPS adds its small delta GEMMs (3 passes of 2 * tokens * delta params). Attention scores and elementwise
    work are left out, so this is the best ratio ALPS can reach, not a prediction.
    """
    s = point["shape"]
    d, L, T = s["width"], s["layers"], point["batch"] * point["seq"]
    heads, kv, dh = s["heads"], s["kv_heads"], s["head_dim"]
    attn = 2 * d * heads * dh + 2 * d * kv * dh
    mlp = 3 * d * s["ffn_mult"] * d
    head = d * s["vocab"]
    lowest = point["lowest_trained_layer"]
    forward = 2 * T * (L * (attn + mlp) + head)
    backward_masked = 2 * T * (L * (attn + mlp) + head)  # input gradients through every layer
    backward_alps = 2 * T * ((L - lowest) * (attn + mlp) + head)
    delta = point["training"]["alps"]["trainable_params"]
    masked = forward + backward_masked + 2 * T * L * attn
    alps = forward + backward_alps + 3 * 2 * T * delta
    return {"alps_gflop": alps / 1e9, "masked_gflop": masked / 1e9, "alps_over_masked": alps / masked}


def targets(point: dict[str, Any]) -> dict[str, Any]:
    tr, fw = point["training"], point["forward"]
    t = {
        "alps_step_over_lora_eq": tr["lora_eq"]["step_ratio_to_alps"] and 1.0 / tr["lora_eq"]["step_ratio_to_alps"],
        "alps_step_over_masked": tr["masked"]["step_ratio_to_alps"] and 1.0 / tr["masked"]["step_ratio_to_alps"],
        "alps_extra_peak_over_lora_eq": tr["alps"]["extra_peak_bytes"] / tr["lora_eq"]["extra_peak_bytes"],
        "alps_unmerged_forward_overhead": fw["alps/unmerged"]["overhead_vs_base"],
        "alps_merged_forward_overhead": fw["alps/merged"]["overhead_vs_base"],
        "flop_bound_alps_over_masked": flop_bound(point)["alps_over_masked"],
    }
    t["met"] = {
        "step <= LoRA (equal params)": t["alps_step_over_lora_eq"] <= 1.0,
        "step <= 0.9x masked recipe": t["alps_step_over_masked"] <= 0.9,
        "extra peak memory <= LoRA": t["alps_extra_peak_over_lora_eq"] <= 1.0,
        "unmerged forward overhead <= 15%": t["alps_unmerged_forward_overhead"] <= 0.15,
        # merged = merge_and_unload(): the very same modules as the base, so only timing noise can separate them
        "merged forward overhead 0% (within noise)": abs(t["alps_merged_forward_overhead"]) <= 0.03,
    }
    return t


def render(result: dict[str, Any]) -> str:
    main = result["main"]
    s = main["shape"]
    lines = [
        f"# Training efficiency ({'quick' if result['quick'] else 'full'} run)",
        "",
        f"Llama-shaped model: width {s['width']}, {s['layers']} layers, {s['heads']} heads "
        f"({s['kv_heads']} KV), head_dim {s['head_dim']}, FFN {s['ffn_mult']}x, vocab {s['vocab']}, "
        f"{main['base_params'] / 1e6:.1f}M params; batch {main['batch']} x {main['seq']} tokens; fp32 CPU, "
        f"{result['env']['torch_threads']} thread(s). ALPS trains {main['selected_heads']}/{main['total_heads']} "
        f"heads (lowest layer {main['lowest_trained_layer']}); LoRA equal-params r={main['lora_eq_rank']}, "
        f"LoRA q/k/v r={main['lora_qkv_rank']} (= 128 x width / 2048). AdamW, medians of "
        f"{main['training']['alps']['step_s']['n']} interleaved rounds.",
        "",
    ]
    rows = []
    for name in METHODS:
        r = main["training"][name]
        rows.append([
            LABELS[name],
            f"{r['trainable_params']:,}" + (f" ({r['effective_trainable_params']:,} eff.)" if name == "masked" else ""),
            r["step_s"]["median"] * 1e3,
            r["step_ratio_to_alps"],
            C.mib(r["extra_peak_bytes"]),
            C.mib(r["optimizer_state_bytes"]),
            C.mib(r["saved_bytes"]),
        ])
    lines.append(C.markdown_table(
        ["method", "trainable params", "step ms (median)", "step / ALPS", "extra peak MiB", "optimizer MiB",
         "saved MiB"], rows))
    lines += ["", "Forward latency (eval, no grad), median over interleaved rounds; overhead = median of per-round "
              "ratios to the base model minus 1.", ""]
    rows = []
    for key, r in main["forward"].items():
        rows.append([key, r["forward_s"]["median"] * 1e3, f"{100 * r['overhead_vs_base']:+.1f}%"])
    lines.append(C.markdown_table(["model", "forward ms", "overhead vs base"], rows))
    t = result["targets"]
    lines += ["", "Targets (issue 2 / issue 7):", ""]
    lines.append(C.markdown_table(["target", "measured", "met"], [
        ["ALPS step <= LoRA at equal params", f"{t['alps_step_over_lora_eq']:.2f}x", t["met"]["step <= LoRA (equal params)"]],
        ["ALPS step <= 0.9x masked recipe", f"{t['alps_step_over_masked']:.2f}x (matmul-FLOP bound "
         f"{t['flop_bound_alps_over_masked']:.2f}x)", t["met"]["step <= 0.9x masked recipe"]],
        ["ALPS extra peak memory <= LoRA's", f"{t['alps_extra_peak_over_lora_eq']:.2f}x", t["met"]["extra peak memory <= LoRA"]],
        ["unmerged forward overhead <= 15%", f"{100 * t['alps_unmerged_forward_overhead']:+.1f}%", t["met"]["unmerged forward overhead <= 15%"]],
        ["merged forward overhead 0%", f"{100 * t['alps_merged_forward_overhead']:+.1f}% (same modules as base)", t["met"]["merged forward overhead 0% (within noise)"]],
    ]))
    titles = {"seq": "Growth with sequence length", "width": "Growth with model width",
              "lowest_layer": "Lowest trained layer (same number of heads, drawn from layers >= it; main model)"}
    for sweep, key in (("seq_sweep", "seq"), ("width_sweep", "width"), ("depth_sweep", "lowest_layer")):
        if not result.get(sweep):
            continue
        lines += ["", f"{titles[key]}: step ms (extra peak MiB)", ""]
        rows = []
        for p in result[sweep]:
            x = p["seq"] if key == "seq" else (p["shape"]["width"] if key == "width" else p["lowest_trained_layer"])
            rows.append([x] + [
                f"{p['training'][m]['step_s']['median'] * 1e3:.0f} ({C.mib(p['training'][m]['extra_peak_bytes']):.0f})"
                for m in METHODS
            ])
        if key == "lowest_layer":
            for row, p in zip(rows, result[sweep]):
                row.append(f"{1 / p['training']['masked']['step_ratio_to_alps']:.2f}x "
                           f"(FLOP bound {flop_bound(p)['alps_over_masked']:.2f}x)")
            lines.append(C.markdown_table([key] + [LABELS[m] for m in METHODS] + ["ALPS / masked"], rows))
        else:
            lines.append(C.markdown_table([key] + [LABELS[m] for m in METHODS], rows))
    lines += ["", C.produced_by(result["env"])]
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for sweep, key, xlabel in (("seq_sweep", "seq", "sequence length"), ("width_sweep", "width", "model width")):
        points = result.get(sweep)
        if not points:
            continue
        xs = [p["seq"] if key == "seq" else p["shape"]["width"] for p in points]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for m in METHODS:
            ax1.plot(xs, [p["training"][m]["step_s"]["median"] * 1e3 for p in points], marker="o", label=LABELS[m])
            ax2.plot(xs, [C.mib(p["training"][m]["extra_peak_bytes"]) for p in points], marker="o", label=LABELS[m])
        ax1.set(xlabel=xlabel, ylabel="step time, ms (median)", title="training step")
        ax2.set(xlabel=xlabel, ylabel="extra peak MiB over the base weights", title="training memory")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        ax1.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, few rounds (a couple of minutes on 2 cores)")
    p.add_argument("--width", type=int, help="model width of the main comparison")
    p.add_argument("--layers", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--rounds", type=int, help="timed interleaved rounds of the main comparison")
    p.add_argument("--forward-rounds", type=int)
    p.add_argument("--sweep-rounds", type=int)
    p.add_argument("--seqs", type=int, nargs="*", help="sequence lengths of the sweep (empty: no sweep)")
    p.add_argument("--widths", type=int, nargs="*", help="widths of the sweep (empty: no sweep)")
    p.add_argument("--sweep-layers", type=int, help="layers of the width/sequence sweep models")
    p.add_argument("--lowest-layers", type=int, nargs="*",
                   help="lowest trained layers for the depth sweep on the main model (empty: no sweep)")
    p.add_argument("--ratio", type=float, default=0.1, help="share of heads ALPS trains")
    p.add_argument("--lora-qkv-rank", type=int, help="rank of the q/k/v LoRA baseline (default 128*width/2048)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine's noise down)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=C.RESULTS)
    p.add_argument("--stem", help="output file stem (default train_efficiency[_quick])")
    args = p.parse_args(argv)
    quick = {"width": 256, "layers": 4, "head_dim": 32, "vocab": 8192, "batch": 2, "seq": 128, "rounds": 5,
             "forward_rounds": 10, "sweep_rounds": 3, "seqs": [64, 256], "widths": [128, 384], "sweep_layers": 2, "lowest_layers": [2]}
    full = {"width": 512, "layers": 4, "head_dim": 64, "vocab": 16384, "batch": 1, "seq": 256, "rounds": 6,
            "forward_rounds": 10, "sweep_rounds": 2, "seqs": [64, 128, 256, 512],
            "widths": [256, 512, 768], "sweep_layers": 2, "lowest_layers": [2]}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.stem = args.stem or ("train_efficiency_quick" if args.quick else "train_efficiency")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    C.quiet_transformers()
    torch.set_num_threads(args.threads)
    env = C.environment()
    shape = Shape(width=args.width, layers=args.layers, head_dim=args.head_dim, vocab=args.vocab)
    print(f"[train_efficiency] main comparison: {shape}, batch {args.batch}x{args.seq}", flush=True)
    result: dict[str, Any] = {"quick": args.quick, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    result["main"] = run_point(shape, args.batch, args.seq, args.rounds, 1, args, full=True)
    result["targets"] = targets(result["main"])
    sweep_shape = Shape(width=args.width, layers=args.sweep_layers, head_dim=args.head_dim, vocab=args.vocab)
    result["seq_sweep"] = []
    for seq in args.seqs:
        print(f"[train_efficiency] sequence sweep: seq {seq}", flush=True)
        result["seq_sweep"].append(run_point(sweep_shape, args.batch, seq, args.sweep_rounds, 1, args, full=False))
    result["width_sweep"] = []
    for width in args.widths:
        print(f"[train_efficiency] width sweep: width {width}", flush=True)
        shape_w = Shape(width=width, layers=args.sweep_layers, head_dim=args.head_dim, vocab=args.vocab)
        result["width_sweep"].append(run_point(shape_w, args.batch, args.seq, args.sweep_rounds, 1, args, full=False))
    result["depth_sweep"] = []
    for lowest in args.lowest_layers:
        print(f"[train_efficiency] depth sweep: lowest trained layer {lowest}", flush=True)
        result["depth_sweep"].append(run_point(shape, args.batch, args.seq, args.sweep_rounds, 1, args, full=False,
                                               min_layer=lowest))
    result["env"] = C.finish_environment(env)
    result["plots"] = plot(result, args.out, args.stem) if (result["seq_sweep"] or result["width_sweep"]) else []
    return C.publish(result, args.out, args.stem, render)


if __name__ == "__main__":
    main(sys.argv[1:])
