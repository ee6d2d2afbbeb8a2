"""ALPS together with LoRA in PEFT's PeftMixedModel (issue: QLoRA, LoRA, export)."""

import json
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, PeftMixedModel, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_alps
from peft_alps import AlpsConfig
from peft_alps.integrations import mixed
from tests.support.tiny_models import batch, tiny_llama, train_steps

N_HEADS, N_KV, D = 8, 2, 8
ALPS_HEADS = {0: [1, 6], 2: [3]}
LORA_R, LORA_ALPHA = 4, 8


def logits(model, x=None):
    model.eval()
    with torch.no_grad():
        return model(batch() if x is None else x).logits


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def lora_config(**kw):
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"], **kw)


# ----------------------------------------------------------------------------- independent oracle


def expected_index(proj, heads):
    """Written independently of peft_alps: rows (q/k/v) or columns (o) owned by a layer's selected heads."""
    groups = sorted({h // (N_HEADS // N_KV) for h in heads})
    own = heads if proj in ("q_proj", "o_proj") else groups
    return [i for h in sorted(own) for i in range(h * D, (h + 1) * D)]


def merged_by_hand(lora_dir=None, alps_dir=None):
    """A plain tiny Llama with the saved LoRA and ALPS deltas added to its weights by hand."""
    model = tiny_llama()
    weights = dict(model.named_parameters())
    with torch.no_grad():
        if lora_dir is not None:
            sd = load_file(Path(lora_dir) / "adapter_model.safetensors")
            for key in sd:
                if key.endswith("lora_A.weight"):
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    b = sd[key.replace("lora_A", "lora_B")]
                    weights[module + ".weight"] += (LORA_ALPHA / LORA_R) * b @ sd[key]
        if alps_dir is not None:
            sd = load_file(Path(alps_dir) / "adapter_model.safetensors")
            for key, delta in sd.items():
                module = key.removeprefix("base_model.model.").removesuffix(".alps_delta")
                layer, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
                index = torch.tensor(expected_index(proj, ALPS_HEADS[layer]))
                w = weights[module + ".weight"]
                if proj == "o_proj":
                    w[:, index] += delta
                else:
                    w[index] += delta
    return model.eval()


def train_and_save(config, path, steps=2):
    model = get_peft_model(tiny_llama(), config)
    train_steps(model, steps=steps)
    model.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- workflow 1: load together


def test_separately_trained_lora_and_alps_equal_both_deltas_merged(tmp_path):
    lora_dir = train_and_save(lora_config(), tmp_path / "lora")
    alps_dir = train_and_save(AlpsConfig(target_heads=ALPS_HEADS), tmp_path / "alps")
    expected = logits(merged_by_hand(lora_dir, alps_dir))

    model = PeftMixedModel.from_pretrained(tiny_llama(), lora_dir, adapter_name="lora")
    model.load_adapter(alps_dir, adapter_name="alps")
    model.set_adapter(["lora", "alps"])
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)

    model.set_adapter(["alps"])
    torch.testing.assert_close(logits(model), logits(merged_by_hand(alps_dir=alps_dir)), rtol=1e-5, atol=1e-5)
    model.set_adapter(["lora"])
    torch.testing.assert_close(logits(model), logits(merged_by_hand(lora_dir=lora_dir)), rtol=1e-5, atol=1e-5)

    model.set_adapter(["lora", "alps"])
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    reference = merged_by_hand(lora_dir, alps_dir)
    for name, w in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], w, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- workflow 2: train together


@pytest.fixture
def joint():
    """LoRA and ALPS trained at once, both on q_proj (ALPS wraps the LoRA layer there)."""
    model = get_peft_model(tiny_llama(), lora_config(), adapter_name="lora", mixed=True)
    assert isinstance(model, PeftMixedModel)
    model.add_adapter("alps", AlpsConfig(target_heads=ALPS_HEADS, target_modules=["q_proj", "k_proj", "o_proj"]))
    return model


def test_both_adapters_train_even_on_the_same_q_proj(joint):
    q = joint.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, peft_alps.AlpsLayer) and isinstance(q.base_layer, peft.tuners.lora.LoraLayer)
    base = {n: p.detach().clone() for n, p in joint.named_parameters() if "alps_" not in n and "lora_" not in n}

    joint.set_adapter(["lora", "alps"])
    names = trainable(joint)
    # trial pitfall 1: ALPS parameters frozen after add_adapter + set_adapter
    assert {n for n in names if "alps_delta" in n} == {
        f"base_model.model.model.layers.{layer}.self_attn.{proj}.alps_delta.alps"
        for layer in ALPS_HEADS
        for proj in ("q_proj", "k_proj", "o_proj")
    }
    assert all(("alps_delta" in n and n.endswith(".alps")) or ("lora_" in n and ".lora." in n) for n in names)
    assert any("q_proj.base_layer.lora_B" in n for n in names)

    train_steps(joint, steps=3)
    params = dict(joint.named_parameters())
    for name in names:
        assert params[name].abs().sum() > 0, f"{name} did not train"  # lora_B and the ALPS deltas start at zero
    for name, w in base.items():
        assert torch.equal(params[name], w), f"{name} changed"


def test_alps_first_then_lora_both_trainable():
    """ALPS as the mixed model's first adapter: PEFT freezes every parameter whose name lacks a known prefix."""
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=ALPS_HEADS), adapter_name="alps", mixed=True)
    assert {n for n in trainable(model)} == {n for n, _ in model.named_parameters() if "alps_delta" in n} != set()
    model.add_adapter("lora", lora_config())
    model.set_adapter(["alps", "lora"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, peft.tuners.lora.LoraLayer) and isinstance(q.base_layer, peft_alps.AlpsLayer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("alps_delta" in n for n in before) and any("lora_A" in n for n in before)
    train_steps(model, steps=2)
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], w) for n, w in before.items())


def test_alps_wrapped_by_lora_exports_under_its_plain_name(tmp_path):
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=ALPS_HEADS, init_weights=False), adapter_name="alps",
                           mixed=True)
    model.add_adapter("lora", lora_config())  # LoRA wraps the ALPS layer of q_proj: ALPS sits at q_proj.base_layer
    model.set_adapter(["alps"])
    expected = logits(model)
    peft_alps.export_to_lora(model, tmp_path, adapter_name="alps")
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("base_layer" in k for k in keys)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path)), expected, rtol=1e-5, atol=1e-5)


def test_set_adapter_lora_deactivates_and_freezes_alps(joint, tmp_path):
    joint.set_adapter(["lora", "alps"])
    train_steps(joint, steps=2)
    both = logits(joint)
    joint.set_adapter(["lora"])
    # trial pitfall 2: ALPS stayed active (and trainable) after set_adapter(["lora"])
    assert not any("alps_" in n for n in trainable(joint))
    assert any("lora_" in n for n in trainable(joint))
    lora_only = logits(joint)
    assert not torch.allclose(lora_only, both)

    dirs = peft_alps.save_mixed_adapters(joint, tmp_path)
    plain_lora = PeftModel.from_pretrained(tiny_llama(), dirs["lora"])
    torch.testing.assert_close(logits(plain_lora), lora_only, rtol=1e-5, atol=1e-5)


def test_each_adapter_saved_on_its_own_and_reloaded(joint, tmp_path):
    joint.set_adapter(["lora", "alps"])
    train_steps(joint, steps=2)
    expected = logits(joint)
    with pytest.raises(NotImplementedError):
        joint.save_pretrained(tmp_path / "x")  # PEFT's own limitation, hence save_mixed_adapters

    dirs = peft_alps.save_mixed_adapters(joint, tmp_path / "saved")
    assert set(dirs) == {"lora", "alps"}
    lora_keys = set(load_file(dirs["lora"] / "adapter_model.safetensors"))
    assert lora_keys and not any("base_layer" in k or "alps" in k for k in lora_keys)  # as plain PEFT writes it
    alps_keys = set(load_file(dirs["alps"] / "adapter_model.safetensors"))
    assert alps_keys and all(k.endswith(".alps_delta") for k in alps_keys)
    assert json.loads((dirs["lora"] / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((dirs["alps"] / "adapter_config.json").read_text())["peft_type"] == "ALPS"

    # the two directories, loaded together again, give the jointly trained model
    again = PeftMixedModel.from_pretrained(tiny_llama(), dirs["lora"], adapter_name="lora")
    again.load_adapter(dirs["alps"], adapter_name="alps")
    again.set_adapter(["lora", "alps"])
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)
    # and merge_and_unload of the jointly trained mixed model keeps its outputs
    merged = joint.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_mixing_on_unknown_model_type_fails_before_any_weight_is_touched():
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(n_embd=32, n_head=4, n_layer=1, vocab_size=50, rotary_dim=4))
    mixed_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="lora", mixed=True)
    before = {k: v.clone() for k, v in mixed_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no head layout for model_type 'gptj'.*Supported model types: .*llama"):
        mixed_model.add_adapter("alps", AlpsConfig(target_heads={0: [0]}))
    assert "alps" not in mixed_model.peft_config
    assert not any(isinstance(m, peft_alps.AlpsLayer) for m in mixed_model.modules())
    assert all(torch.equal(before[k], v) for k, v in mixed_model.state_dict().items())
    with pytest.raises(ValueError, match=r"no head layout for model_type 'gptj'"):
        get_peft_model(GPTJForCausalLM(model.config), AlpsConfig(target_heads={0: [0]}), mixed=True)


def test_bad_heads_in_mixed_model_fail_before_injection():
    model = get_peft_model(tiny_llama(), lora_config(), adapter_name="lora", mixed=True)
    with pytest.raises(ValueError, match=r"head 9 out of range: layer 0 has 8 query heads \(0\.\.7\)"):
        model.add_adapter("alps", AlpsConfig(target_heads={0: [9]}))
    assert not any(isinstance(m, peft_alps.AlpsLayer) for m in model.modules())


# ----------------------------------------------------------------------------- PEFT internals


def test_installed_peft_passes_the_internal_checks():
    assert mixed.check_internals() == []
    assert mixed.is_installed()


@pytest.mark.parametrize(
    "target,attr,value,message",
    [
        ("peft.tuners.mixed.model", "Layers", [], r"Layers is no longer a tuple"),
        ("peft.tuners.mixed.model", "PREFIXES", ("lora_",), r"PREFIXES is no longer a list"),
        ("peft.tuners.mixed.model.MixedModel", "set_adapter", lambda self, name, inference_mode=False: None,
         r"MixedModel\.set_adapter no longer uses Layers"),
        ("peft.mixed_model", "_check_config_compatible", lambda config: None,
         r"_check_config_compatible no longer uses COMPATIBLE_TUNER_TYPES"),
    ],
    ids=["layers-type", "prefixes-type", "set_adapter-code", "compat-check-code"],
)
def test_changed_peft_internal_is_detected(monkeypatch, target, attr, value, message):
    import importlib

    module_path, _, cls = target.partition(".MixedModel")
    owner = importlib.import_module(module_path)
    if cls or target.endswith("MixedModel"):
        owner = owner.MixedModel
    monkeypatch.setattr(owner, attr, value)
    assert any(re.search(message, problem) for problem in mixed.check_internals())


def test_alps_of_a_mixed_model_exports_to_lora(joint, tmp_path):
    """ALPS inside a mixed model (wrapping LoRA on q_proj) exports like a plain one; served next to the LoRA
    adapter as two LoRA adapters, it reproduces the jointly trained model."""
    joint.set_adapter(["lora", "alps"])
    train_steps(joint, steps=2)
    expected = logits(joint)
    joint.set_adapter(["alps"])
    alps_only = logits(joint)
    peft_alps.export_to_lora(joint, tmp_path / "alps_as_lora", adapter_name="alps")
    dirs = peft_alps.save_mixed_adapters(joint, tmp_path / "saved", adapter_names=["lora"])

    served = PeftModel.from_pretrained(tiny_llama(), tmp_path / "alps_as_lora", adapter_name="alps")
    torch.testing.assert_close(logits(served), alps_only, rtol=1e-5, atol=1e-5)
    served.load_adapter(dirs["lora"], adapter_name="lora")
    served.base_model.set_adapter(["lora", "alps"])
    torch.testing.assert_close(logits(served), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- AlpsModel's safeguards, mixed too


def saved_alps(path, heads, mutate=None):
    """An ALPS adapter saved from a plain PeftModel (what load_adapter reads), optionally damaged by ``mutate``."""
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=heads, init_weights=False))
    model.save_pretrained(path)
    if mutate is not None:
        mutate(Path(path))
    return path


def nan_weights(folder):
    from safetensors.torch import save_file

    state = load_file(folder / "adapter_model.safetensors")
    next(iter(state.values()))[0, 0] = float("nan")
    save_file(state, folder / "adapter_model.safetensors")


def pickle_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


@pytest.mark.parametrize(
    "mutate,error,message",
    [
        (nan_weights, ValueError, r"NaN/inf values; the adapter is broken"),
        (pickle_only, OSError, r"loaded only from safetensors"),
    ],
    ids=["nan", "pickle-only"],
)
def test_mixed_load_adapter_checks_the_alps_file_before_injecting(tmp_path, mutate, error, message):
    alps_dir = saved_alps(tmp_path / "alps", ALPS_HEADS, mutate)
    model = get_peft_model(tiny_llama(), lora_config(), adapter_name="lora", mixed=True)
    with pytest.raises(error, match=message):
        model.load_adapter(alps_dir, adapter_name="alps")
    assert "alps" not in model.peft_config
    assert not any(isinstance(m, peft_alps.AlpsLayer) for m in model.modules())


def test_mixed_model_refuses_alps_deltas_of_another_head_selection(tmp_path):
    """What resuming a training run does: load saved weights into the adapter the model has. Deltas saved for other
    heads (same shapes, other layers) would otherwise load partially, in silence."""
    from peft import set_peft_model_state_dict

    other = saved_alps(tmp_path / "other", {1: [0], 2: [5]})  # ALPS_HEADS is {0: [1, 6], 2: [3]}
    model = get_peft_model(tiny_llama(), lora_config(), adapter_name="lora", mixed=True)
    model.add_adapter("alps", AlpsConfig(target_heads=ALPS_HEADS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)do not fit the adapter 'alps'.*layers\.1\.self_attn\.q_proj \(delta\): "
                                         r"saved, but this adapter trains no head there"):
        set_peft_model_state_dict(model, load_file(other / "adapter_model.safetensors"), adapter_name="alps")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same selection loads
    same = saved_alps(tmp_path / "same", ALPS_HEADS)
    set_peft_model_state_dict(model, load_file(same / "adapter_model.safetensors"), adapter_name="alps")


LOWEST, LAYERS = 2, 4


def layer_gradients(model):
    """Indices of the decoder layers whose output receives a gradient in one training step's backward pass."""
    fired, handles = set(), []
    for i, layer in enumerate(model.base_model.model.model.layers):

        def on_output(module, args, output, i=i):
            output = output[0] if isinstance(output, tuple) else output
            if output.requires_grad:
                output.register_hook(lambda grad, i=i: fired.add(i))

        handles.append(layer.register_forward_hook(on_output))
    model.train()
    x = batch()
    model(input_ids=x, labels=x).loss.backward()
    for handle in handles:
        handle.remove()
    return fired


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("lora_layer", [3, 1], ids=["lora-above", "lora-below"])
def test_mixed_model_backward_stops_at_the_lowest_trained_layer(reentrant, lora_layer):
    """As in AlpsModel (see training.py): with gradient checkpointing and Trainer's enable_input_require_grads, no
    backward runs below the lowest layer that trains something, here ALPS's or LoRA's."""
    model = get_peft_model(tiny_llama(layers=LAYERS), lora_config(layers_to_transform=[lora_layer], init_lora_weights=False),
                           adapter_name="lora", mixed=True)
    model.add_adapter("alps", AlpsConfig(target_heads={LOWEST: [1], 3: [0]}))
    model.set_adapter(["lora", "alps"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # what Trainer / SFTTrainer call with gradient checkpointing
    lowest = min(LOWEST, lora_layer)
    assert layer_gradients(model) == set(range(lowest, LAYERS))
    trained = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_mixed_model_unloaded_gets_transformers_behaviour_back():
    model = get_peft_model(tiny_llama(layers=LAYERS), AlpsConfig(target_heads={LOWEST: [1]}), adapter_name="alps",
                           mixed=True)
    assert "enable_input_require_grads" in vars(model.base_model.model)
    merged = model.merge_and_unload()
    assert "enable_input_require_grads" not in vars(merged)
    lora_only = get_peft_model(tiny_llama(), lora_config(), adapter_name="lora", mixed=True)
    assert "enable_input_require_grads" not in vars(lora_only.base_model.model)  # no ALPS: left to transformers
    lora_only.add_adapter("alps", AlpsConfig(target_heads=ALPS_HEADS))
    assert "enable_input_require_grads" in vars(lora_only.base_model.model)
    lora_only.delete_adapter("alps")
    assert "enable_input_require_grads" not in vars(lora_only.base_model.model)
