"""The real-model tier (``pytest -m real``): SmolLM2-135M-Instruct materialized by peft_alps.models."""

import json

import pytest
import torch

pytestmark = pytest.mark.real


def test_materialized_folder_is_an_ordinary_checkpoint(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_alps import models

    names = {p.name for p in smollm2_folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", models.MARKER} <= names
    assert not any(p.name.startswith(".") for p in smollm2_folder.parent.iterdir() if p.is_dir())  # no staging left
    provenance = json.loads((smollm2_folder / models.MARKER).read_text())
    assert provenance["source_bytes"] == models.gguf_path("smollm2-135m").stat().st_size
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (30, 9, 3, 64)
    assert models.load("smollm2-135m") == smollm2_folder  # cached

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
