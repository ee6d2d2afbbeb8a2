"""Localization with PEFT-wrapped task models in memory (issue 14, item 6): never score the frozen base silently.

Oracle: ``localize_heads(base, peft_model)`` must give the scores of ``localize_heads(base, merged)``, where
``merged = copy.deepcopy(peft_model).merge_and_unload()`` is PEFT's own merge; the PEFT model must be unchanged.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model

from peft_alps import AlpsConfig, localize_heads
from tests.support.tiny_models import tiny_llama

QKV = ["q_proj", "k_proj", "v_proj"]


def lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=QKV, init_lora_weights=False, **kw)


def trained_alps(base, heads={0: [1, 5], 2: [3]}):
    model = get_peft_model(base, AlpsConfig(target_heads=heads))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".alps_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def merged_scores(task, base=None):
    return localize_heads(base if base is not None else tiny_llama(), copy.deepcopy(task).merge_and_unload()).scores


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", ["lora", "alps"])
def test_unmerged_task_model_scores_as_its_merged_copy(kind):
    task = get_peft_model(tiny_llama(), lora()) if kind == "lora" else trained_alps(tiny_llama())
    before = state(task)
    scores = localize_heads(tiny_llama(), task).scores
    expected = merged_scores(task)
    assert expected.any()  # the fine-tune moved heads (the frozen base would score all 0)
    assert np.array_equal(scores, expected)
    assert_unchanged(task, before)
    assert not any(getattr(m, "merged", False) for m in task.modules())


def test_alps_task_model_moves_only_the_heads_it_trains():
    heads = {0: [1], 2: [6]}  # group size 4: heads 0..3 share layer 0's KV group 0, heads 4..7 layer 2's group 1
    scores = localize_heads(tiny_llama(), trained_alps(tiny_llama(), heads)).scores
    moved = {(layer, h) for layer, h in zip(*np.nonzero(scores))}
    assert moved == {(0, h) for h in range(4)} | {(2, h) for h in range(4, 8)}  # k/v rows are shared by a group


def test_get_peft_model_on_the_base_itself_reads_the_base_without_adapters():
    """``task = get_peft_model(base, ...)`` wraps base's own modules: base is read frozen, task adapted."""
    base = tiny_llama()
    task = get_peft_model(base, lora())
    expected = merged_scores(task)
    assert np.array_equal(localize_heads(base, task).scores, expected)
    task.merge_adapter()  # merged in place: base must still be read without the adapter
    np.testing.assert_allclose(localize_heads(base, task).scores, expected, rtol=1e-6, atol=1e-12)
    task.unmerge_adapter()


def test_disabled_or_inactive_adapters_score_what_the_model_computes():
    task = get_peft_model(tiny_llama(), lora(), adapter_name="one")
    task.add_adapter("two", lora())
    task.set_adapter("two")
    with task.disable_adapter(), pytest.warns(UserWarning, match="every head scored exactly 0"):
        assert not localize_heads(tiny_llama(), task).scores.any()
    expected_two = merged_scores(task)
    assert np.array_equal(localize_heads(tiny_llama(), task).scores, expected_two)
    task.merge_adapter()  # "two" merged: read as stored
    np.testing.assert_allclose(localize_heads(tiny_llama(), task).scores, expected_two, rtol=1e-6, atol=1e-12)
    with task.disable_adapter():
        scores = localize_heads(tiny_llama(), task).scores  # disabled: the merged delta taken out again
    assert scores.max() < 1e-6 * expected_two.max()  # float32 rounding of W + dW - dW
    task.unmerge_adapter()


def test_gpt2_conv1d_with_fan_in_fan_out_lora():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    build = lambda: transformers.GPT2LMHeadModel(config).eval()  # noqa: E731
    torch.manual_seed(0)
    base = build()
    torch.manual_seed(0)
    task = get_peft_model(build(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                              init_lora_weights=False))
    scores = localize_heads(base, task).scores
    torch.manual_seed(0)
    expected = localize_heads(build(), copy.deepcopy(task).merge_and_unload()).scores
    assert expected.any() and np.array_equal(scores, expected)


def test_mixed_model_alps_wrapping_lora():
    task = get_peft_model(tiny_llama(), lora(), adapter_name="lora", mixed=True)
    task.add_adapter("alps", AlpsConfig(target_heads={0: [2], 1: [7]}, target_modules=["q_proj", "v_proj"]))
    task.set_adapter(["lora", "alps"])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in task.named_parameters():
            if ".alps_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    np.testing.assert_allclose(localize_heads(tiny_llama(), task).scores, merged_scores(task), rtol=1e-6, atol=1e-15)  # float32 sums in another order


def test_saved_and_reloaded_task_adapter(tmp_path):
    trained = get_peft_model(tiny_llama(), lora())
    trained.save_pretrained(tmp_path)
    task = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert np.array_equal(localize_heads(tiny_llama(), task).scores, merged_scores(trained))


# ----------------------------------------------------------------------------- refused, naming merge_and_unload


@pytest.mark.parametrize(
    "config,what",
    [
        (lora(use_dora=True), "LoRA variant"),
        (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
         "not an additive weight delta"),
    ],
    ids=["dora", "ia3"],
)
def test_adapters_without_an_additive_delta_are_refused(config, what):
    task = get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match=rf"{what}.*merge_and_unload\(\)"):
        localize_heads(tiny_llama(), task)


def test_prompt_learning_task_model_is_refused():
    task = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt-learning PEFT model: it changes no attention weight"):
        localize_heads(tiny_llama(), task)


def test_identical_models_warn_that_top_k_would_pick_by_index():
    base = tiny_llama()
    with pytest.warns(UserWarning, match=r"every head scored exactly 0.*top_k would pick heads by index order"):
        scores = localize_heads(base, tiny_llama())
    assert not scores.scores.any()
