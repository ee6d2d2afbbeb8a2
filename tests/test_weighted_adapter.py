"""``add_weighted_adapter`` on ALPS models (issue 14, item 3): exact weighted sums over the union of head slices.

Oracle: each source adapter's full weight delta is read back from the model's weights after merging that adapter
alone (merged minus unmerged state dict), independently of how ALPS stores its slices. The combined adapter, merged,
must give ``W + sum_i w_i * dW_i``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

import peft_alps
from peft_alps import AlpsConfig
from tests.support.tiny_models import batch, tiny_llama

MATH = {0: [1, 5], 2: [3]}
CODE = {1: [0], 2: [3, 6]}  # overlaps MATH at layer 2, head 3; heads 3 and 6 are in different KV groups


def randomize(model, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".alps_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def two_adapters(base=None, math=None, code=None):
    model = get_peft_model(base if base is not None else tiny_llama(), math or AlpsConfig(target_heads=MATH),
                           adapter_name="math")
    model.add_adapter("code", code or AlpsConfig(target_heads=CODE, target_modules=["q_proj", "k_proj", "v_proj"]))
    randomize(model)
    return model.eval()


def weights_with(model, adapters):
    """The base model's weights with ``adapters`` merged (``[]``: none), the model left unmerged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Already unmerged" from layers the adapter does not cover
        if adapters:
            model.merge_adapter(adapters)
        state = {k.replace(".base_layer", ""): v.clone() for k, v in model.get_base_model().state_dict().items()
                 if ".alps_" not in k}
        if adapters:
            model.unmerge_adapter()
    return state


def oracle_error(model, adapters, weights, combined):
    plain = weights_with(model, [])
    deltas = [{k: v - plain[k] for k, v in weights_with(model, [a]).items()} for a in adapters]
    got = weights_with(model, [combined])
    return max(
        float((got[k] - (plain[k] + sum(w * d[k] for w, d in zip(weights, deltas)))).abs().max()) for k in plain
    )


@pytest.mark.parametrize("weights", [[0.7, -1.3], [1.0, 1.0]], ids=["signed", "sum"])
def test_merged_combination_is_w_plus_weighted_deltas(weights):
    model = two_adapters()
    model.add_weighted_adapter(["math", "code"], weights, "mix")
    assert oracle_error(model, ["math", "code"], weights, "mix") <= 1e-6
    config = model.peft_config["mix"]
    assert config.target_heads == {0: [1, 5], 1: [0], 2: [3, 6]}
    assert config.target_modules == model.peft_config["math"].target_modules | {"q_proj", "k_proj", "v_proj"}
    assert model.active_adapters == ["math"]  # as with LoRA: not made active
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".mix"))


def test_combination_runs_as_its_merged_weights_and_survives_save_and_load(tmp_path):
    model = two_adapters()
    model.add_weighted_adapter(["math", "code"], [0.5, 2.0], "mix")
    model.set_adapter("mix")
    x = batch()
    with torch.no_grad():
        expected = model(x).logits
        merged = {k: v for k, v in weights_with(model, ["mix"]).items()}
    reference = tiny_llama()
    reference.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(reference(x).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=1e-6)
    assert loaded.peft_config["default"].head_selection == {"weighted_combination": {"math": 0.5, "code": 2.0}}


def test_fused_transposed_family_with_biases():
    """GPT-2: Conv1D storage, fused c_attn (q, k and v rows of a head in one weight), biases on the row slices."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(config).eval()
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1], 2: [0, 3]}), adapter_name="math")
    model.add_adapter("code", AlpsConfig(target_heads={1: [2], 2: [3]}, alps_bias=True))
    randomize(model)
    model.add_weighted_adapter(["math", "code"], [-0.4, 1.5], "mix")
    assert model.peft_config["mix"].alps_bias  # code's bias slices are part of the sum
    assert any(name.endswith("alps_bias.mix") for name, _ in model.named_parameters())
    assert oracle_error(model, ["math", "code"], [-0.4, 1.5], "mix") <= 1e-6


def test_single_adapter_scaling():
    model = two_adapters()
    model.add_weighted_adapter(["code"], [3.0], "code3")
    assert oracle_error(model, ["code"], [3.0], "code3") <= 1e-6
    assert model.peft_config["code3"].target_heads == CODE


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(adapters=["math", "nope"], weights=[1, 1]), r"Adapter nope does not exist"),
        (dict(adapters=["math", "code"], weights=[1.0]), r"one number per adapter: 2 adapters, weights=\[1\.0\]"),
        (dict(adapters=["math", "code"], weights=[1.0, float("nan")]), r"finite numbers, got nan"),
        (dict(adapters=[], weights=[]), r"non-empty list of adapter names"),
        (dict(adapters=["math", "math"], weights=[1, 1]), r"name an adapter twice"),
        (dict(adapters=["math", "code"], weights=[1, 1], combination_type="svd"),
         r"combination_type='svd' is not available for ALPS adapters.*combination_type='linear'"),
    ],
    ids=["unknown", "weights-length", "nan-weight", "empty", "twice", "svd"],
)
def test_bad_requests_are_refused_and_leave_the_model_alone(kwargs, message):
    model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(adapter_name="mix", **kwargs)
    assert sorted(model.peft_config) == ["code", "math"]
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "code,message",
    [
        (AlpsConfig(target_heads=CODE, target_modules=r".*\.(q_proj|v_proj)"),
         r"same target modules type.*mix of list/set and string"),
        (AlpsConfig(target_heads=CODE, exclude_modules=["model.layers.2.self_attn.q_proj"]),
         r"exclude different modules"),
        (AlpsConfig(target_heads=CODE, modules_to_save=["lm_head"]), r"\['code'\] train whole modules"),
    ],
    ids=["target-module-types", "excludes", "modules-to-save"],
)
def test_adapters_that_cannot_combine_exactly_are_refused(code, message):
    model = two_adapters(code=code)
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(["math", "code"], [1, 1], "mix")
    assert "mix" not in model.peft_config
    assert not any(isinstance(m, peft_alps.AlpsLayer) and "mix" in m.alps_delta for m in model.modules())


def test_adapters_recorded_for_other_geometries_are_refused():
    model = two_adapters()
    model.peft_config["code"].head_layout = {**model.peft_config["code"].head_layout, "num_kv_heads": 8}
    with pytest.raises(ValueError, match=r"different attention geometries.*num_kv_heads': 8"):
        model.add_weighted_adapter(["math", "code"], [1, 1], "mix")
    assert "mix" not in model.peft_config


def test_an_existing_name_is_left_alone_with_a_warning():
    model = two_adapters()
    before = model.base_model.model.model.layers[0].self_attn.q_proj.alps_delta["math"].clone()
    with pytest.warns(UserWarning, match=r"adapter 'math' already exists"):
        model.add_weighted_adapter(["code"], [2.0], "math")
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.alps_delta["math"], before)
