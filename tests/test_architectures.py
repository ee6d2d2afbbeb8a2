"""Architecture coverage: every registered family, on a tiny model built from its transformers config.

The oracles here are written from the transformers modeling code, independently of ``peft_alps.layouts``:
each family lists its attention module paths and the kind of head storage, and ``expected_indices`` spells
out which rows/columns a set of heads owns. The registry is never used to build an expected value.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, convert_to_lora, get_peft_model, set_peft_model_state_dict
from safetensors import safe_open

import peft_alps
from peft_alps import AlpsConfig, layouts

VOCAB = 61
HEADS = {0: [2], 2: [0, 1, 3]}  # layer 1 has no selected head; layer 2 mixes heads that share a KV group


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and what the test knows about its attention, written from transformers' code.

    ``proj`` maps each attention module path (inside one block) to how its heads are stored:
    ``q``/``k``/``v`` (head-major output rows), ``o`` (head-major input columns), ``concat`` (fused, rows
    ``[q heads | k groups | v groups]``), ``grouped`` (fused, rows ``[group][n/g query heads, k, v][d]``).
    """

    name: str
    config_cls: str
    config: dict
    n: int  # query heads
    g: int  # KV groups
    d: int  # head_dim
    hidden: int
    block: str  # module list holding the layers
    proj: dict
    bias: frozenset = frozenset()  # paths whose module has a bias
    transposed: bool = False  # GPT-2 Conv1D: weight stored [in, out]
    auto: str = "AutoModelForCausalLM"
    extra: dict = field(default_factory=dict)

    def build(self, seed=0):
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_cls)(vocab_size=VOCAB, **self.config)
        return getattr(transformers, self.auto).from_config(config).eval()


SEPARATE = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o"}
LLAMA_LIKE = dict(intermediate_size=48, num_hidden_layers=3, max_position_embeddings=64)

FAMILIES = [
    Family("llama", "LlamaConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, **LLAMA_LIKE),
           4, 2, 8, 32, "layers", SEPARATE),
    Family("mistral", "MistralConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, **LLAMA_LIKE),
           4, 1, 8, 32, "layers", SEPARATE),  # MQA
    Family("mixtral", "MixtralConfig",
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                num_experts_per_tok=1, **LLAMA_LIKE),
           4, 2, 8, 32, "layers", SEPARATE),
    Family("qwen2", "Qwen2Config", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, **LLAMA_LIKE),
           4, 2, 8, 32, "layers", SEPARATE, bias=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"})),
    Family("qwen3", "Qwen3Config",  # head_dim 16 != hidden / heads = 8
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **LLAMA_LIKE),
           4, 2, 16, 32, "layers", SEPARATE),
    Family("gemma", "GemmaConfig",  # MQA, head_dim 16 != 8
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16, **LLAMA_LIKE),
           4, 1, 16, 32, "layers", SEPARATE),
    Family("gemma2", "Gemma2Config",
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=12, **LLAMA_LIKE),
           4, 2, 12, 32, "layers", SEPARATE),
    Family("phi3", "Phi3Config",
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                eos_token_id=0, **LLAMA_LIKE),
           4, 2, 8, 32, "layers", {"self_attn.qkv_proj": "concat", "self_attn.o_proj": "o"}),
    Family("gpt2", "GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
           4, 4, 8, 32, "h", {"attn.c_attn": "concat", "attn.c_proj": "o"},
           bias=frozenset({"attn.c_attn", "attn.c_proj"}), transposed=True),
    Family("gpt_neox", "GPTNeoXConfig",
           dict(hidden_size=32, num_attention_heads=4, bos_token_id=0, eos_token_id=0, **LLAMA_LIKE),
           4, 4, 8, 32, "layers", {"attention.query_key_value": "grouped", "attention.dense": "o"},
           bias=frozenset({"attention.query_key_value", "attention.dense"})),
    Family("opt", "OPTConfig",
           dict(hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64,
                bos_token_id=0, eos_token_id=0, pad_token_id=1),
           4, 4, 8, 32, "layers",
           {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o"},
           bias=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"})),
    Family("falcon_multi_query", "FalconConfig",  # Falcon-7B style: MQA, [q heads | k | v]
           dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, multi_query=True, bos_token_id=0,
                eos_token_id=0),
           4, 1, 8, 32, "h", {"self_attention.query_key_value": "grouped", "self_attention.dense": "o"}),
    Family("falcon_new_decoder", "FalconConfig",  # Falcon-40B style: GQA groups [q, q, k, v], with biases
           dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_kv_heads=2,
                new_decoder_architecture=True, bias=True, bos_token_id=0, eos_token_id=0),
           4, 2, 8, 32, "h", {"self_attention.query_key_value": "grouped", "self_attention.dense": "o"},
           bias=frozenset({"self_attention.query_key_value", "self_attention.dense"})),
    Family("falcon_mha", "FalconConfig",  # Falcon-RW style: MHA, [q|k|v] per head
           dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, multi_query=False, bos_token_id=0,
                eos_token_id=0),
           4, 4, 8, 32, "h", {"self_attention.query_key_value": "grouped", "self_attention.dense": "o"}),
    Family("bert", "BertConfig",
           dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=0),
           4, 4, 8, 32, "layer",
           {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
            "attention.output.dense": "o"},
           bias=frozenset({"attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense"}),
           auto="AutoModelForMaskedLM"),
    # further families served by the same storage kinds
    Family("gemma3_text", "Gemma3TextConfig",
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **LLAMA_LIKE),
           4, 2, 16, 32, "layers", SEPARATE),
    Family("qwen2_moe", "Qwen2MoeConfig",
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                moe_intermediate_size=16, shared_expert_intermediate_size=16, **LLAMA_LIKE),
           4, 2, 8, 32, "layers", SEPARATE, bias=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"})),
    Family("qwen3_moe", "Qwen3MoeConfig",  # MQA, head_dim 16 != 8
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_experts=2,
                num_experts_per_tok=1, moe_intermediate_size=16, **LLAMA_LIKE),
           4, 1, 16, 32, "layers", SEPARATE),
    Family("starcoder2", "Starcoder2Config",
           dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
                **LLAMA_LIKE),
           4, 2, 8, 32, "layers", SEPARATE, bias=frozenset(SEPARATE)),
    Family("phi", "PhiConfig", dict(hidden_size=32, num_attention_heads=4, **LLAMA_LIKE),
           4, 4, 8, 32, "layers",
           {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.dense": "o"},
           bias=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"})),
    Family("bloom", "BloomConfig", dict(hidden_size=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0),
           4, 4, 8, 32, "h", {"self_attention.query_key_value": "grouped", "self_attention.dense": "o"},
           bias=frozenset({"self_attention.query_key_value", "self_attention.dense"})),
    Family("gpt_bigcode_multi_query", "GPTBigCodeConfig",  # split (embed, kv_dim, kv_dim): [q heads | k | v]
           dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, multi_query=True, bos_token_id=0, eos_token_id=0),
           4, 1, 8, 32, "h", {"attn.c_attn": "concat", "attn.c_proj": "o"},
           bias=frozenset({"attn.c_attn", "attn.c_proj"})),
    Family("gpt_bigcode_mha", "GPTBigCodeConfig",  # view(heads, 3 * head_dim): [q|k|v] per head
           dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, multi_query=False, bos_token_id=0, eos_token_id=0),
           4, 4, 8, 32, "h", {"attn.c_attn": "grouped", "attn.c_proj": "o"},
           bias=frozenset({"attn.c_attn", "attn.c_proj"})),
    Family("roberta", "RobertaConfig",
           dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=1),
           4, 4, 8, 32, "layer",
           {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
            "attention.output.dense": "o"},
           bias=frozenset({"attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense"}),
           auto="AutoModelForMaskedLM"),
    Family("distilbert", "DistilBertConfig",
           dict(dim=32, hidden_dim=48, n_layers=3, n_heads=4, max_position_embeddings=64, pad_token_id=0),
           4, 4, 8, 32, "layer",
           {"attention.q_lin": "q", "attention.k_lin": "k", "attention.v_lin": "v", "attention.out_lin": "o"},
           bias=frozenset({"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"}),
           auto="AutoModelForMaskedLM"),
]
IDS = [f.name for f in FAMILIES]
# every family with the default alps_bias=False, and the families whose projections have biases with alps_bias=True ("heads")
BIAS_CASES = [pytest.param(f, "none", id=f.name) for f in FAMILIES] + [
    pytest.param(f, "heads", id=f"{f.name}-bias_heads") for f in FAMILIES if f.bias
]


# ----------------------------------------------------------------------------- independent oracles


def head_rows(kind, n, g, d, h):
    """Output rows of query head ``h``'s q piece and its KV group's k/v pieces inside a weight of ``kind``."""
    per_group = n // g
    x = h // per_group  # the head's KV group
    span = lambda start: set(range(start, start + d))  # noqa: E731
    if kind in ("q", "k", "v"):
        return {kind: span((h if kind == "q" else x) * d)}
    if kind == "concat":  # [n query heads | g key heads | g value heads]
        return {"q": span(h * d), "k": span(n * d + x * d), "v": span(n * d + g * d + x * d)}
    if kind == "grouped":  # g blocks, each [its per_group query heads, one key head, one value head]
        block = (per_group + 2) * d
        return {"q": span(x * block + (h % per_group) * d), "k": span(x * block + per_group * d),
                "v": span(x * block + (per_group + 1) * d)}
    raise AssertionError(kind)


def expected_indices(kind, n, g, d, heads):
    """``(axis, indices)`` that query heads ``heads`` own in a projection of ``kind``; axis 0 = output rows."""
    if kind == "o":  # the output projection reads head h from input columns [h*d, (h+1)*d)
        return 1, {h * d + i for h in heads for i in range(d)}
    return 0, set().union(*(rows for h in heads for rows in head_rows(kind, n, g, d, h).values()))


def expected_trainable(fam, target_heads, bias="none"):
    """Trainable parameters from the family's geometry: (heads, groups) x head_dim x hidden, plus, with
    ``bias="heads"``, the selected rows of biased projections."""
    total = 0
    for heads in target_heads.values():
        nh, ng = len(heads), len({h // (fam.n // fam.g) for h in heads})
        for path, kind in fam.proj.items():
            rows = {"q": nh, "k": ng, "v": ng, "concat": nh + 2 * ng, "grouped": nh + 2 * ng}.get(kind)
            if rows is None:  # o: all outputs x the selected heads' input columns, bias not head-sliced
                total += fam.hidden * nh * fam.d
            else:
                total += rows * fam.d * fam.hidden + (rows * fam.d if bias == "heads" and path in fam.bias else 0)
    return total


def attention_key(fam, name):
    """``(layer, path, "weight"|"bias")`` if ``name`` is an attention tensor of ``fam``, else None."""
    paths = "|".join(re.escape(p) for p in fam.proj)
    found = re.search(rf"(?:^|\.){fam.block}\.(\d+)\.({paths})\.(weight|bias)$", name)
    return None if found is None else (int(found.group(1)), found.group(2), found.group(3))


def changed_indices(before, after, axis):
    """Indices along ``axis`` ([out, in] orientation already applied) where any entry differs."""
    diff = (after != before)
    if diff.dim() == 1:
        return set(torch.nonzero(diff).flatten().tolist())
    other = 1 - axis
    return set(torch.nonzero(diff.any(dim=other)).flatten().tolist())


def assert_only_selected_slices_changed(fam, before, after, target_heads, exact=False, bias="none"):
    checked = 0
    for name, old in before.items():
        new = after[name]
        key = attention_key(fam, name)
        if key is None or key[0] not in target_heads:
            assert torch.equal(old, new), f"{name} changed but holds no selected head"
            continue
        layer, path, param = key
        axis, allowed = expected_indices(fam.proj[path], fam.n, fam.g, fam.d, target_heads[layer])
        if param == "bias":
            if axis == 1 or bias == "none":  # the output projection's bias is not per head; "none" trains no bias
                assert torch.equal(old, new), f"{name} changed"
                continue
            changed = changed_indices(old, new, 0)
        else:
            if fam.transposed:
                old, new = old.T, new.T
            changed = changed_indices(old, new, axis)
            # a row slice spans every input column (and a column slice every output row)
            assert changed, f"{name}: no change at all"
        assert changed <= allowed, f"{name}: changed {sorted(changed - allowed)} outside the selected heads"
        if exact:
            assert changed == allowed, f"{name}: {sorted(allowed - changed)} of the selected slices did not change"
        checked += 1
    assert checked >= len(target_heads) * len(fam.proj)


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (2, 7), generator=g)


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=inputs() if x is None else x).logits


def train(model, steps=3, lr=1e-2):
    x = inputs(seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- adapter on every family


@pytest.mark.parametrize("fam,bias", BIAS_CASES)
def test_default_targets_identity_and_trainable_count(fam, bias):
    base = fam.build()
    ref = logits(base)
    model = get_peft_model(base, AlpsConfig(target_heads=HEADS, alps_bias=bias == "heads"))

    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, peft_alps.AlpsLayer)}
    expected = {n for n, _ in base.named_modules() if (k := attention_key(fam, n + ".weight")) and k[0] in HEADS}
    assert len(expected) == len(HEADS) * len(fam.proj)
    assert wrapped == expected

    assert torch.equal(logits(model), ref)
    assert n_trainable(model) == expected_trainable(fam, HEADS, bias)
    allowed = ("alps_delta", "alps_bias") if bias == "heads" else ("alps_delta",)
    assert all(n.split(".")[-2] in allowed for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("fam,bias", BIAS_CASES)
def test_training_moves_output_merge_matches_and_touches_only_selected_slices(fam, bias):
    base = fam.build()
    before = state(base)
    ref = logits(base)
    model = train(get_peft_model(base, AlpsConfig(target_heads=HEADS, alps_bias=bias == "heads")))
    unmerged = logits(model)
    assert not torch.allclose(unmerged, ref, atol=1e-4)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-4, atol=1e-5)
    assert_only_selected_slices_changed(fam, before, state(merged), HEADS, bias=bias)


@pytest.mark.parametrize("fam,bias", BIAS_CASES)
def test_merge_changes_exactly_the_selected_slices_and_delta_weight_orientation(fam, bias):
    base = fam.build()
    before = state(base)
    model = get_peft_model(base, AlpsConfig(target_heads=HEADS, init_weights=False, alps_bias=bias == "heads"))
    deltas = {
        n.removeprefix("base_model.model."): m.get_delta_weight("default")
        for n, m in model.named_modules()
        if isinstance(m, peft_alps.AlpsLayer)
    }
    unmerged = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)
    merged = model.merge_and_unload()
    after = state(merged)
    assert_only_selected_slices_changed(fam, before, after, HEADS, exact=True, bias=bias)
    # get_delta_weight is the full delta in the stored orientation (Conv1D: [in, out]), as LoRA's is
    for module_name, delta in deltas.items():
        diff = after[module_name + ".weight"] - before[module_name + ".weight"]
        torch.testing.assert_close(delta, diff, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_qkv_delta_reaches_only_the_selected_heads_attention_outputs(fam):
    """Behavioural check, independent of any index formula: with deltas on the q/k/v weights of head 2 of
    layer 0 only, the attention output of layer 0 (the o-projection's input) changes only for heads that use
    head 2's KV group, and does change for head 2."""
    base = fam.build()
    o_path = next(p for p, kind in fam.proj.items() if kind == "o")
    o_name = next(n for n, _ in base.named_modules() if n.endswith(f"{fam.block}.0.{o_path}"))
    seen = []
    base.get_submodule(o_name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    logits(base)
    qkv = [p for p, kind in fam.proj.items() if kind != "o"]
    model = get_peft_model(base, AlpsConfig(target_heads={0: [2]}, target_modules=qkv, init_weights=False))
    logits(model)
    changed_cols = set(torch.nonzero((seen[1] != seen[0]).flatten(0, -2).any(dim=0)).flatten().tolist())
    group = 2 // (fam.n // fam.g)
    sharing = [h for h in range(fam.n) if h // (fam.n // fam.g) == group]
    allowed = {h * fam.d + i for h in sharing for i in range(fam.d)}
    assert set(range(2 * fam.d, 3 * fam.d)) <= changed_cols <= allowed


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.name in ("gpt2", "phi3", "gpt_neox")], ids=lambda f: f.name)
def test_peft_convert_to_lora_reproduces_the_weight_delta(fam):
    """PEFT's own ``convert_to_lora`` (SVD of ``get_delta_weight``) must give a LoRA with the same weight update,
    Conv1D orientation included (the default bias="none" trains no bias deltas, which a LoRA could not hold)."""
    base = fam.build()
    model = get_peft_model(base, AlpsConfig(target_heads=HEADS, init_weights=False))
    expected = logits(model)
    lora_config, lora_state = convert_to_lora(model, rank=1.0)
    lora = get_peft_model(fam.build(), lora_config)
    set_peft_model_state_dict(lora, lora_state)
    assert lora_state and torch.allclose(logits(lora), expected, atol=1e-4)


def test_peft_convert_to_lora_refuses_head_bias_deltas():
    """A LoRA cannot hold the heads' bias deltas (``alps_bias=True`` on a biased base): PEFT's ``convert_to_lora``
    must refuse the layers rather than return a LoRA that silently drops them."""
    fam = next(f for f in FAMILIES if f.name == "gpt2")
    model = get_peft_model(fam.build(), AlpsConfig(target_heads=HEADS, alps_bias=True, init_weights=False))
    with pytest.raises(TypeError, match="alps"):
        convert_to_lora(model, rank=1.0)


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.name in ("gpt2", "phi3", "falcon_new_decoder", "bert")],
                         ids=lambda f: f.name)
def test_export_to_lora_serves_the_same_outputs_with_plain_peft(fam, tmp_path):
    """Fused, Conv1D-transposed and biased layouts survive the exact LoRA export (loaded without peft_alps code);
    with the default bias="none" a biased base exports no LoRA bias and no warning."""
    model = get_peft_model(fam.build(), AlpsConfig(target_heads=HEADS, init_weights=False))
    expected = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_alps.export_to_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(fam.build(), tmp_path)
    assert lora.peft_config["default"].peft_type == "LORA"
    torch.testing.assert_close(logits(lora), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.name in ("gpt2", "phi3", "falcon_new_decoder", "bert")],
                         ids=lambda f: f.name)
def test_save_and_reload_on_fused_transposed_and_encoder_layouts(fam, tmp_path):
    model = get_peft_model(fam.build(), AlpsConfig(target_heads=HEADS, init_weights=False))
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fam.build(), tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fam_name,targets,valid",
    [("gpt2", ["c_proj"], "attn.c_proj"), ("bert", ["output.dense"], "attention.output.dense")],
)
def test_leaf_names_shared_with_the_mlp_are_refused_naming_the_attention_paths(fam_name, targets, valid):
    fam = next(f for f in FAMILIES if f.name == fam_name)
    base = fam.build()
    before = state(base)
    with pytest.raises(ValueError, match="is not an attention projection") as err:
        get_peft_model(base, AlpsConfig(target_heads=HEADS, target_modules=targets))
    assert valid in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in state(base).items())  # nothing was replaced


def test_a_second_sub_model_with_the_same_module_names_is_refused_until_excluded(tmp_path):
    """Multimodal models hold a vision tower whose blocks also read ``layers.N.self_attn.q_proj``; wrapping or scoring
    them with the text model's head slices would be wrong, so ALPS refuses and says how to leave them out."""
    fam = FAMILIES[0]  # llama
    base = fam.build()
    base.vision_tower = copy.deepcopy(base.model)  # same module names under another prefix
    with pytest.raises(ValueError, match="both match layer 0's self_attn.[qkv]_proj.*language model alone"):
        peft_alps.localize_heads(base, base)
    base.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="both match layer 0's self_attn.[qkv]_proj.*language model alone"):
        peft_alps.localize_heads(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="both match layer 0's self_attn.q_proj.*exclude_modules"):
        get_peft_model(base, AlpsConfig(target_heads=HEADS))
    model = get_peft_model(base, AlpsConfig(target_heads=HEADS, exclude_modules=r".*vision_tower.*"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, peft_alps.AlpsLayer)}
    assert wrapped and not any("vision_tower" in n for n in wrapped)


def test_a_custom_layout_that_does_not_fit_the_modules_is_refused_before_wrapping(monkeypatch):
    monkeypatch.setattr(layouts, "_REGISTRY", dict(layouts._REGISTRY))
    gpt2 = next(f for f in FAMILIES if f.name == "gpt2")
    attn = (layouts.Projection("attn.c_attn", "qkv", transposed=True), layouts.Projection("attn.c_proj", "o", transposed=True))
    cases = [
        # Conv1D stores [in, out]: forgetting transposed=True would merge the delta into the wrong axis
        (dict(projections=(layouts.Projection("attn.c_attn", "qkv"), attn[1])), r"Conv1D .*register it with transposed=True"),
        # a dims reader that gets head_dim wrong (16 instead of 8) would slice the wrong rows
        (dict(projections=attn, dims=lambda c: layouts.HeadDims(c.n_layer, c.n_head, c.n_head, 16)),
         r"has 96 output features, but the gpt2 head layout expects 192 .*head_dim 16"),
        # c_attn declared as separate q: its 96 rows are not 4 heads x 8
        (dict(projections=(layouts.Projection("attn.c_attn", "q", transposed=True), attn[1])),
         r"has 96 output features, but the gpt2 head layout expects 32 for a 'q' projection"),
    ]
    for fields, message in cases:
        layouts.register_layout(layouts.HeadLayout(model_types=("gpt2",), layers="h", **fields), override=True)
        base = gpt2.build()
        before = state(base)
        with pytest.raises(ValueError, match=message):
            get_peft_model(base, AlpsConfig(target_heads=HEADS))
        assert not any(isinstance(m, peft_alps.AlpsLayer) for m in base.modules())
        assert all(torch.equal(before[k], v) for k, v in state(base).items())


def test_registering_over_a_built_in_family_needs_override(monkeypatch):
    monkeypatch.setattr(layouts, "_REGISTRY", dict(layouts._REGISTRY))
    mine = layouts.HeadLayout(model_types=("gpt2",), layers="h", projections=(layouts.Projection("attn.c_attn", "qkv"),))
    with pytest.raises(ValueError, match="'gpt2' is already registered.*override=True"):
        layouts.register_layout(mine)
    assert layouts.get_layout("gpt2") is not mine
    layouts.register_layout(mine, override=True)
    assert layouts.get_layout("gpt2") is mine


# ----------------------------------------------------------------------------- registry vs transformers code


def heads_moved_by(model, layout, dims, path, rows, tokens):
    """Which query heads' attention outputs change when ``rows`` (output features) of layer 0's ``path`` move.

    The oracle is the forward pass itself: a forward pre-hook reads the output projection's input, where head
    ``h`` occupies the columns the registry gives its ``o`` role, so a wrong row or column map shows up as the
    wrong heads moving (or none)."""
    o_path = next(p.path for p in layout.projections if p.role == "o")
    modules = dict(model.named_modules())
    layer0 = next(n[: -len(o_path) - 1] for n in modules if n.endswith(f"{layout.layers}.0.{o_path}"))
    seen = []
    hook = modules[f"{layer0}.{o_path}"].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(tokens)
            module = modules[f"{layer0}.{path}"]
            weight = module.weight.T if isinstance(module, transformers.pytorch_utils.Conv1D) else module.weight
            saved = weight[rows].clone()
            weight[rows] += torch.randn(saved.shape, generator=torch.Generator().manual_seed(0), dtype=saved.dtype)
            model(tokens)
            weight[rows] = saved
    finally:
        hook.remove()
    before, after = seen
    moved = set()
    for h in range(dims.num_heads):
        _, cols = layouts.head_parts("o", dims, h)["o"]
        if (after[..., cols] - before[..., cols]).abs().max() > 1e-4 * before.abs().max():  # float32 (MoE kernels take no float64)
            moved.add(h)
    return moved


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_registry_matches_the_forward_pass(fam):
    """For every head and every q/k/v piece the registry assigns to it, moving exactly those rows moves the
    attention output of that head (q) or of every head in its KV group (k, v), and of no other head."""
    model = fam.build()
    layout, dims = layouts.layout_for_config(model.config)
    assert (dims.num_heads, dims.num_kv_heads, dims.head_dim) == (fam.n, fam.g, fam.d)
    tokens = torch.arange(1, 7).view(1, -1)
    for projection in (p for p in layout.projections if p.role != "o"):
        for h in range(dims.num_heads):
            group = {j for j in range(dims.num_heads) if dims.kv_group(j) == dims.kv_group(h)}
            for part, (axis, rows) in layouts.head_parts(projection.role, dims, h).items():
                assert axis == "out"
                expected = {h} if part == "q" else group
                assert heads_moved_by(model, layout, dims, projection.path, rows, tokens) == expected, (
                    f"{fam.name}: {projection.path} rows the registry gives head {h}'s {part}")


# ----------------------------------------------------------------------------- localization on every family


def perturbed_pair(fam):
    """A base and a task model that differs only in head 1's q piece in layer 0 and in the k/v pieces of
    head 3's KV group in layer 2. Returns them with the set of (layer, head) whose per-head matrices moved:
    (0, 1), and every head of layer 2 that shares head 3's KV group."""
    base = fam.build()
    task = fam.build()
    g = torch.Generator().manual_seed(7)
    edits = [(0, 1, ("q",)), (2, 3, ("k", "v"))]
    with torch.no_grad():
        for layer, head, parts in edits:
            for path, kind in fam.proj.items():
                if kind == "o":
                    continue
                module = next(m for n, m in task.named_modules() if n.endswith(f"{fam.block}.{layer}.{path}"))
                for part, rows in head_rows(kind, fam.n, fam.g, fam.d, head).items():
                    if part not in parts:
                        continue
                    rows = torch.tensor(sorted(rows))
                    weight = module.weight.T if fam.transposed else module.weight  # [out, in] view
                    weight[rows] += 0.5 * torch.randn(weight[rows].shape, generator=g)
    group = 3 // (fam.n // fam.g)
    moved = {(0, 1)} | {(2, h) for h in range(fam.n) if h // (fam.n // fam.g) == group}
    return base, task, moved


def assert_ranks_first(scores, moved):
    ranking = [tuple(x) for x in scores.ranking()]
    assert set(ranking[: len(moved)]) == moved, ranking
    top = np.asarray(scores.scores)
    assert all(top[layer, head] > 0 for layer, head in moved)
    assert all(top[layer, head] == 0 for layer, head in ranking[len(moved):])


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_localization_ranks_perturbed_heads_first_from_checkpoints_and_models(fam, tmp_path):
    base, task, moved = perturbed_pair(fam)
    in_memory = peft_alps.localize_heads(base, task)
    assert in_memory.scores.shape == (3, fam.n)
    assert_ranks_first(in_memory, moved)

    # Checkpoint tensor names differ from module names: the base is saved with its head's prefix
    # (``model.``, ``transformer.``, ``bert.``, ...), the task as the bare backbone (no prefix at all).
    base.save_pretrained(tmp_path / "base")
    task.base_model.save_pretrained(tmp_path / "task")
    with safe_open(str(tmp_path / "task" / "model.safetensors"), "pt") as f:
        task_names = list(f.keys())
    assert all(not n.startswith(base.base_model_prefix + ".") for n in task_names)
    from_files = peft_alps.localize_heads(tmp_path / "base", tmp_path / "task")
    assert_ranks_first(from_files, moved)
    np.testing.assert_allclose(from_files.scores, in_memory.scores, rtol=1e-9, atol=0)


# ----------------------------------------------------------------------------- registry index maps, any geometry

ROLE_TO_KIND = {"q": "q", "k": "k", "v": "v", "o": "o", "qkv": "concat", "qkv_grouped": "grouped"}


@st.composite
def geometry_and_heads(draw):
    g = draw(st.integers(1, 4))
    n = g * draw(st.integers(1, 4))
    d = draw(st.integers(1, 5))
    heads = draw(st.sets(st.integers(0, n - 1), min_size=1))
    return n, g, d, sorted(heads)


@settings(max_examples=60, deadline=None)
@given(geometry_and_heads(), st.sampled_from(sorted(ROLE_TO_KIND)))
def test_head_slice_and_head_parts_match_the_written_out_index_sets(case, role):
    n, g, d, heads = case
    dims = layouts.HeadDims(num_layers=1, num_heads=n, num_kv_heads=g, head_dim=d)
    axis, indices = layouts.head_slice(role, dims, heads)
    expected_axis, expected = expected_indices(ROLE_TO_KIND[role], n, g, d, heads)
    assert (axis, indices) == ({0: "out", 1: "in"}[expected_axis], sorted(expected))
    if role != "o":
        for h in heads:
            parts = layouts.head_parts(role, dims, h)
            assert {k: set(v[1]) for k, v in parts.items()} == head_rows(ROLE_TO_KIND[role], n, g, d, h)


def readme_custom_architecture_example():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "architectures.md").read_text()
    section = readme.split("## Custom architectures", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_custom_architecture_example_runs(monkeypatch):
    monkeypatch.setattr(layouts, "_REGISTRY", dict(layouts._REGISTRY))  # the example's registration stays here
    namespace = {}
    exec(compile(readme_custom_architecture_example(), "docs/architectures.md", "exec"), namespace)
    model = namespace["model"]
    assert "gptj" in layouts.supported_model_types()
    gptj = Family("gptj", "GPTJConfig", {}, 4, 4, 16, 64, "h",
                  {"attn.q_proj": "q", "attn.k_proj": "k", "attn.v_proj": "v", "attn.out_proj": "o"})
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, peft_alps.AlpsLayer)}
    assert wrapped == {f"transformer.h.1.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert n_trainable(model) == expected_trainable(gptj, {1: [0, 3]})
    x = torch.randint(0, 128, (1, 5))
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=x).logits
    assert torch.equal(logits(model, x), ref)
    train(model)
    assert not torch.allclose(logits(model, x), ref, atol=1e-4)


def test_unsupported_model_raises_one_clear_error():
    base = transformers.AutoModelForCausalLM.from_config(
        transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64)
    )
    with pytest.raises(ValueError) as err:
        get_peft_model(base, AlpsConfig(target_heads={0: [1]}))
    message = str(err.value)
    assert "'gptj'" in message
    for family in ("llama", "gpt2", "gpt_neox", "falcon", "bert", "phi3", "opt"):
        assert family in message
    assert "register_layout" in message and "Custom architectures" in message


def test_every_family_in_this_file_is_registered_with_the_geometry_the_test_expects():
    for fam in FAMILIES:
        config = getattr(transformers, fam.config_cls)(vocab_size=VOCAB, **fam.config)
        layout, dims = layouts.layout_for_config(config)
        assert (dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (3, fam.n, fam.g, fam.d)
        assert sorted(layout.default_target_modules) == sorted(fam.proj)
