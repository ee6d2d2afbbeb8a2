"""Mixed-adapter batches (issue 14, item 2): ``model(x, adapter_names=[...])`` and ``generate(..., adapter_names=...)``.

Oracle: each row of a mixed batch must equal the same batch run with only that row's adapter active (or with the
adapters disabled for ``"__base__"`` rows), for forward logits, greedy generation and beam search. PEFT's own
mixed-batch tests are written for LoRA only, hence these.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

import peft_alps
from peft_alps import AlpsConfig
from tests.support.tiny_models import tiny_llama

VOCAB = 61
ADAPTERS = {"math": {0: [1], 2: [0, 3]}, "code": {1: [2], 2: [3]}}  # overlap at layer 2, head 3
ROWS = ["math", "code", "__base__", "code", "math"]
TOL = 1e-5


def tiny(family: str) -> torch.nn.Module:
    if family == "llama_gqa":  # 8 query heads in 2 KV groups
        return tiny_llama()
    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D (transposed), fused c_attn, biases
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
    else:  # phi3: fused qkv_proj [q heads | k groups | v groups], GQA
        config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, num_hidden_layers=3,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def two_adapter_model(family: str, **config_kw):
    model = get_peft_model(tiny(family), AlpsConfig(target_heads=ADAPTERS["math"], **config_kw), adapter_name="math")
    model.add_adapter("code", AlpsConfig(target_heads=ADAPTERS["code"], **config_kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".alps_" in name:  # large enough that the adapters' outputs differ clearly
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def prompts(n=len(ROWS), length=6, seed=1):
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference; -inf entries (tokens that min_new_tokens masks) must sit at the same places."""
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b)) and torch.equal(a[~finite], b[~finite])
    return float((a[finite] - b[finite]).abs().max())


def run_as(model, name, fn):
    """``fn()`` with only ``name`` active (``"__base__"``: adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    try:
        return fn()
    finally:
        model.set_adapter("math")


FAMILIES = ["llama_gqa", "gpt2", "phi3"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    bias = {"bias": "heads"} if request.param == "gpt2" else {}  # GPT-2: the heads' c_attn bias entries too
    return two_adapter_model(request.param, **bias)


def test_forward_rows_equal_their_adapter_alone(model):
    x = prompts()
    with torch.no_grad():
        mixed = model(x, adapter_names=ROWS).logits
        alone = {name: run_as(model, name, lambda: model(x).logits) for name in set(ROWS)}
    assert (alone["math"] - alone["code"]).abs().max() > 0.05  # the adapters really differ (the test can fail)
    assert (alone["code"] - alone["__base__"]).abs().max() > 0.05
    for i, name in enumerate(ROWS):
        assert max_diff(mixed[i], alone[name][i]) <= TOL, (i, name)
    # the hooks lived for that call only: a plain call is the active adapter again
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, alone["math"], rtol=0, atol=0)
    assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, peft_alps.AlpsLayer))


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_generate_rows_equal_their_adapter_alone(model, num_beams):
    x = prompts(length=5)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        mixed = model.generate(input_ids=x, adapter_names=ROWS, **kw)
        alone = {name: run_as(model, name, lambda: model.generate(input_ids=x, **kw)) for name in set(ROWS)}
    assert not torch.equal(alone["math"].sequences, alone["code"].sequences)
    for i, name in enumerate(ROWS):
        assert torch.equal(mixed.sequences[i], alone[name].sequences[i]), (i, name)
    if num_beams == 1:  # per-step logits of each row
        for step, scores in enumerate(mixed.scores):
            for i, name in enumerate(ROWS):
                assert max_diff(scores[i], alone[name].scores[step][i]) <= TOL
    else:  # beam scores of each row's best sequence
        for i, name in enumerate(ROWS):
            assert abs(float(mixed.sequences_scores[i] - alone[name].sequences_scores[i])) <= TOL


def test_an_all_base_batch_is_the_base_model():
    model = two_adapter_model("llama_gqa")
    x = prompts(3)
    with torch.no_grad():
        mixed = model(x, adapter_names=["__base__"] * 3).logits
        base = tiny("llama_gqa")(x).logits
    torch.testing.assert_close(mixed, base, rtol=0, atol=TOL)


def test_mixed_rows_use_head_slices_never_a_full_delta(monkeypatch):
    model = two_adapter_model("llama_gqa")

    def refuse(self, adapter_name):
        raise AssertionError("get_delta_weight (a full-size delta) was built in a mixed-batch forward")

    monkeypatch.setattr(peft_alps.AlpsLayer, "get_delta_weight", refuse)
    with torch.no_grad():
        model(prompts(), adapter_names=ROWS)


def test_modules_to_save_follow_the_row_adapter():
    model = two_adapter_model("llama_gqa", modules_to_save=["lm_head"])
    with torch.no_grad():
        for name in ADAPTERS:  # a different trained head per adapter
            model.base_model.model.lm_head.modules_to_save[name].weight.mul_(1.5 if name == "math" else 0.5)
    x = prompts()
    with torch.no_grad():
        mixed = model(x, adapter_names=ROWS).logits
        alone = {name: run_as(model, name, lambda: model(x).logits) for name in set(ROWS)}
    for i, name in enumerate(ROWS):
        assert max_diff(mixed[i], alone[name][i]) <= TOL, (i, name)


# ----------------------------------------------------------------------------- refusals, as LoRA refuses


def test_refused_while_merged_until_unmerged():
    model = two_adapter_model("llama_gqa")
    x = prompts()
    model.merge_adapter(["math"])
    with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when there are merged adapters, please call "
                                         r"`unmerge_adapter` first"):
        model(x, adapter_names=ROWS)
    model.unmerge_adapter()
    with torch.no_grad():
        model(x, adapter_names=ROWS)


@pytest.mark.parametrize(
    "names,error,message",
    [
        (["math", "nope", "__base__", "typo", "code"], ValueError, r"non-existing adapter\(s\): nope, typo"),
        (["math", "code"], ValueError, r"Length of `adapter_names` should be the same as the number of inputs, "
                                       r"but got 2 and 5"),
        ("math", TypeError, r"expected a list of str"),
    ],
    ids=["unknown", "length", "not-a-list"],
)
def test_bad_adapter_names_are_refused(names, error, message):
    model = two_adapter_model("llama_gqa")
    with pytest.raises(error, match=message), torch.no_grad():
        model(prompts(), adapter_names=names)


def test_refused_in_training_mode():
    model = two_adapter_model("llama_gqa")
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(prompts(), adapter_names=ROWS)
