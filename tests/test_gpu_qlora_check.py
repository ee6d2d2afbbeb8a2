"""The prepared GPU script (benchmarks/gpu_qlora_check.py): its skip path and its equal-parameter QLoRA rank."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.support.benchmark_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("gpu_qlora_check")


def test_lora_rank_matching_counts_real_lora_parameters(bench):
    hidden, layers, heads, kv, inter, vocab = bench.SIZES["tiny"]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3 * bench.lora_params_per_rank("tiny")
    assert bench.matching_lora_rank(trainable, "tiny") == 3
    assert bench.matching_lora_rank(1, "tiny") == 1


def test_selected_heads_are_ten_percent_and_valid(bench):
    _, layers, heads, _, _, _ = bench.SIZES["small"]
    chosen = bench.pick_heads("small")
    assert sum(len(h) for h in chosen.values()) == -(-layers * heads // 10)
    assert all(0 <= layer < layers and all(0 <= h < heads for h in hs) for layer, hs in chosen.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_without_cuda_the_script_skips_cleanly(bench, tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "no CUDA device" in result["skipped"] and result["versions"]["peft"]
