"""Tiny transformers models built from configs, for offline tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 97


def llama_config(num_heads=8, num_kv_heads=2, head_dim=8, layers=3, **kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=kw.pop("hidden_size", 64),
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        **kw,
    )


def tiny_llama(num_heads=8, num_kv_heads=2, head_dim=8, layers=3, seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(llama_config(num_heads, num_kv_heads, head_dim, layers, **kw)).eval()


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def batch(n=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def train_steps(model, steps=3, lr=1e-2, seed=1):
    x = batch(seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model
