"""transformers' own adapter API (``PeftAdapterMixin`` on every ``PreTrainedModel``) on ALPS adapters: load, switch,
disable, enable, save, and ``from_pretrained`` of an adapter directory, as users do with LoRA adapters."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_alps import AlpsConfig, AlpsLayer
from tests.support.tiny_models import batch, tiny_llama

HEADS_A = {0: [1, 4], 2: [3]}
HEADS_B = {1: [0, 7]}


def logits(model):
    with torch.no_grad():
        return model(batch()).logits


def saved_adapter(path, heads, seed, base=None):
    torch.manual_seed(seed)
    model = get_peft_model(base or tiny_llama(), AlpsConfig(target_heads=heads, init_weights=False))
    model.save_pretrained(path)
    return logits(model)


def test_load_switch_disable_enable_and_save(tmp_path):
    expected_a = saved_adapter(tmp_path / "a", HEADS_A, seed=1)
    expected_b = saved_adapter(tmp_path / "b", HEADS_B, seed=2)
    model = tiny_llama()
    base = logits(model)

    model.load_adapter(str(tmp_path / "a"), adapter_name="a")
    assert model.active_adapters() == ["a"]
    assert any(isinstance(m, AlpsLayer) for m in model.modules())
    torch.testing.assert_close(logits(model), expected_a, rtol=0, atol=1e-6)

    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model.set_adapter("b")
    assert model.active_adapters() == ["b"]
    torch.testing.assert_close(logits(model), expected_b, rtol=0, atol=1e-6)

    model.disable_adapters()
    assert torch.equal(logits(model), base)
    model.enable_adapters()
    torch.testing.assert_close(logits(model), expected_b, rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path / "saved")  # transformers saves the active adapter in PEFT's format
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    assert AlpsConfig.from_pretrained(str(tmp_path / "saved")).target_heads == HEADS_B
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded), expected_b, rtol=0, atol=1e-6)


def test_from_pretrained_of_an_adapter_directory_loads_base_and_adapter(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # its path is what the adapter config records
    expected = saved_adapter(tmp_path / "adapter", HEADS_A, seed=3, base=base)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert model.active_adapters() == ["default"]
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)
