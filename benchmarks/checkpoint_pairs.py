"""Synthetic base/task checkpoint pairs of a given Llama shape, saved as safetensors folders: what the localization
benchmarks (``localize_bench``, ``localize_remote``) score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PairShape:
    name: str
    layers: int
    heads: int
    hidden: int
    kv_heads: int
    dtype: str = "bfloat16"
    ffn: int = 256
    vocab: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def attention_params(self) -> int:
        d, dh = self.hidden, self.head_dim
        return self.layers * (2 * d * self.heads * dh + 2 * d * self.kv_heads * dh)

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )


def build_pair(shape: PairShape, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``base/`` and ``task/`` safetensors checkpoints of ``shape`` under ``root`` (reused if present)."""
    import torch
    from transformers import AutoModelForCausalLM

    base_dir, task_dir = root / "base", root / "task"
    if (base_dir / "config.json").exists() and (task_dir / "config.json").exists():
        return base_dir, task_dir
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.config())
    dtype = getattr(torch, shape.dtype)
    model.to(dtype).save_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.002)
        d = shape.head_dim
        for layer in range(0, shape.layers, max(1, shape.layers // 3)):  # a few heads fine-tuned "harder"
            head = (3 * layer + 1) % shape.heads
            q = model.model.layers[layer].self_attn.q_proj.weight
            q[head * d : (head + 1) * d].add_(torch.randn(d, shape.hidden, generator=gen).to(q.dtype) * 0.05)
    model.save_pretrained(task_dir)
    del model
    return base_dir, task_dir


def parse_shape(text: str) -> PairShape:
    dims, *rest = text.split(":")
    layers, heads, hidden = (int(x) for x in dims.lower().split("x"))
    kv = int(rest[0]) if rest else heads
    dtype = rest[1] if len(rest) > 1 else "bfloat16"
    return PairShape(f"{layers}L x {heads}H x {hidden}", layers, heads, hidden, kv, dtype)
