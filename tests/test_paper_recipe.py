"""peft_alps.tuner.paper_recipe: the paper's reading of ALPS (every weight but the non-selected heads' q/k/v) as a PEFT
config. The right parameters train, nothing else moves, and save / reload / merge round-trip."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_alps import AlpsConfig, modules_outside_attention, paper_recipe
from tests.support.tiny_models import batch, tiny_llama, train_steps

HEADS = {0: [1], 2: [4, 5]}  # 8 query heads, 2 KV groups of 4, head_dim 8
D, GROUP = 8, 4


def q_rows(heads):
    return [r for h in heads for r in range(h * D, (h + 1) * D)]


def kv_rows(heads):
    return [r for g in sorted({h // GROUP for h in heads}) for r in range(g * D, (g + 1) * D)]


def trained(seed=0):
    base = tiny_llama(seed=seed)
    model = get_peft_model(copy.deepcopy(base), paper_recipe(base, target_heads=HEADS))
    train_steps(model, steps=3, lr=1e-2)
    return base, model


def test_config_targets_q_k_v_and_saves_every_other_weight():
    base = tiny_llama()
    config = paper_recipe(base, target_heads=HEADS)
    assert isinstance(config, AlpsConfig) and config.target_heads == HEADS
    assert sorted(config.target_modules) == ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert config.modules_to_save == ["down_proj", "gate_proj", "input_layernorm", "norm", "o_proj",
                                      "post_attention_layernorm", "up_proj"]
    narrowed = paper_recipe(base, target_heads=HEADS, target_modules=["self_attn.q_proj"])
    assert "k_proj" in narrowed.modules_to_save and "v_proj" in narrowed.modules_to_save


def test_exactly_the_paper_parameters_change():
    """Oracle: the merged model against the base, tensor by tensor, with the head rows written from Llama's layout."""
    base, model = trained()
    merged = model.merge_and_unload().state_dict()
    before = base.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # embeddings stay frozen (PEFT would untie them)
        assert torch.equal(merged[key], before[key]), key
    for layer in range(3):
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            moved = (merged[key] != before[key]).any(dim=1).nonzero().flatten().tolist()
            assert moved == (rows(HEADS[layer]) if layer in HEADS else []), key  # only the selected heads' rows
        for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                     "post_attention_layernorm"):
            key = f"model.layers.{layer}.{name}.weight"
            assert not torch.equal(merged[key], before[key]), key  # everything outside q/k/v trains
    assert not torch.equal(merged["model.norm.weight"], before["model.norm.weight"])


def test_save_reload_and_merge_round_trip(tmp_path):
    base, model = trained()
    x = batch(seed=3)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_same_modules_serve_lora_in_the_paper_reading():
    """The paper's "+ LoRA" row: LoRA on q/k/v plus the same modules_to_save."""
    base = tiny_llama()
    outside = modules_outside_attention(base)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"],
                                                           modules_to_save=outside))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in names) and any("mlp.up_proj.modules_to_save" in n for n in names)
    assert not any("embed_tokens" in n for n in names)


def test_errors_name_the_fix():
    base = tiny_llama()
    with pytest.raises(ValueError, match="paper_recipe computes modules_to_save.*pass it to AlpsConfig directly"):
        paper_recipe(base, target_heads=HEADS, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"module name 'q_proj' names both a module to train .*and one that must "
                                         r"stay frozen.*full module paths"):
        modules_outside_attention(base, ["model.layers.0.self_attn.q_proj"])
    with pytest.raises(ValueError, match="needs heads to train"):
        paper_recipe(base)
