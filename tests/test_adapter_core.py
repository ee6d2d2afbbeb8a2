"""Adapter core: config, head-sliced layers, registration, save/load, merge (issue: adapter core)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_alps
from peft_alps import AlpsConfig
from tests.support.tiny_models import batch, tiny_llama, tiny_qwen2, train_steps

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------- independent oracles


def expected_slices(heads, n_heads, n_kv, d):
    """Independently written: {proj: (axis, set of indices)} for one layer's selected query heads."""
    group = n_heads // n_kv
    q_rows = {h * d + i for h in heads for i in range(d)}
    kv_groups = {h // group for h in heads}
    kv_rows = {g * d + i for g in kv_groups for i in range(d)}
    return {"q_proj": (0, q_rows), "k_proj": (0, kv_rows), "v_proj": (0, kv_rows), "o_proj": (1, q_rows)}


def expected_trainable(target_heads, n_heads, n_kv, d, hidden, targets=ATTN):
    total = 0
    for heads in target_heads.values():
        groups = len({h // (n_heads // n_kv) for h in heads})
        per = {
            "q_proj": len(heads) * d * hidden,
            "k_proj": groups * d * hidden,
            "v_proj": groups * d * hidden,
            "o_proj": hidden * len(heads) * d,
        }
        total += sum(per[t] for t in targets)
    return total


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits(model, x=None):
    with torch.no_grad():
        return model(batch() if x is None else x).logits


# ----------------------------------------------------------------------------- counts and identity


@pytest.mark.parametrize(
    "n_heads,n_kv,heads",
    [
        (8, 8, {0: [1, 5], 2: [0]}),  # MHA
        (8, 2, {0: [1, 5], 2: [0, 3]}),  # GQA: heads 0 and 3 share a KV group
        (8, 1, {1: [0, 7], 2: [4]}),  # MQA
    ],
    ids=["mha", "gqa", "mqa"],
)
def test_trainable_count_matches_formula(n_heads, n_kv, heads):
    base = tiny_llama(num_heads=n_heads, num_kv_heads=n_kv)
    model = get_peft_model(base, AlpsConfig(target_heads=heads))
    assert n_trainable(model) == expected_trainable(heads, n_heads, n_kv, 8, 64)
    assert all(n.split(".")[-2] == "alps_delta" for n, p in model.named_parameters() if p.requires_grad)


def test_narrowed_targets_qkv_only():
    heads = {0: [2], 1: [6]}
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=heads, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert n_trainable(model) == expected_trainable(heads, 8, 2, 8, 64, targets=ATTN[:3])
    assert not any("o_proj.alps" in n for n, _ in model.named_parameters())


def test_identity_at_init_and_untouched_layers_unwrapped():
    base = tiny_llama()
    ref = logits(base)
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1], 2: [3]}))
    assert torch.equal(logits(model), ref)
    # layer 1 has no selected heads, so it keeps its plain Linear layers
    assert type(model.base_model.model.model.layers[1].self_attn.q_proj) is torch.nn.Linear


def test_qwen2_default_trains_no_bias_and_alps_bias_trains_the_head_bias_slices():
    heads = {0: [1], 1: [0, 3]}
    d, hidden, group = 16, 64, 2
    weights = expected_trainable(heads, 4, 2, d, hidden)
    default = get_peft_model(tiny_qwen2(), AlpsConfig(target_heads=heads))
    assert default.peft_config["default"].bias == "none" and default.peft_config["default"].alps_bias is False
    assert n_trainable(default) == weights  # as in LoRA and the paper: the heads' W_q/W_k/W_v (and W_o) slices only
    assert not any(".alps_bias." in n for n, _ in default.named_parameters())

    model = get_peft_model(tiny_qwen2(), AlpsConfig(target_heads=heads, alps_bias=True))
    biases = sum(len(h) * d + 2 * len({x // group for x in h}) * d for h in heads.values())  # q, k, v biases
    assert n_trainable(model) == weights + biases
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.alps_bias["default"].shape == (d,)
    assert "default" not in model.base_model.model.model.layers[0].self_attn.o_proj.alps_bias  # o's bias is not per head


def test_alps_bias_is_per_adapter_for_peft_several_adapters_mixed_models_and_disabling():
    """The heads' bias slices belong to their adapter (not PEFT's shared ``bias``): several adapters may have them,
    disabling restores the base exactly without a warning, and a LoRA next to ALPS in a mixed model keeps its own
    ``bias``."""
    import warnings

    from peft import LoraConfig

    base = tiny_qwen2()
    ref = logits(base)
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1]}, alps_bias=True, init_weights=False))
    model.add_adapter("other", AlpsConfig(target_heads={1: [0]}, alps_bias=True, init_weights=False))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.alps_bias["default"].requires_grad and not q.base_layer.bias.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.disable_adapter():
            assert torch.equal(logits(model), ref)
    assert model.peft_config["default"].alps_bias and model.peft_config["other"].alps_bias

    mixed = get_peft_model(tiny_qwen2(), LoraConfig(r=2, target_modules=["v_proj"], bias="all"), "lora", mixed=True)
    mixed.add_adapter("alps", AlpsConfig(target_heads={0: [1]}, alps_bias=True))
    mixed.set_adapter(["lora", "alps"])
    trainable = {n for n, p in mixed.named_parameters() if p.requires_grad}
    assert any(".alps_bias.alps" in n for n in trainable)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in trainable  # LoRA's bias="all"


@pytest.mark.parametrize("bad", ["lora_only", "", True, "Heads"])
def test_bad_bias_rejected_at_config_time_listing_the_valid_values(bad):
    with pytest.raises(ValueError, match=rf"bias={bad!r} is not valid for ALPS; use one of \['none', 'all', "
                                         r"'alps_only'\].*alps_bias=True"):
        AlpsConfig(target_heads={0: [0]}, bias=bad)


@pytest.mark.parametrize("bias, trained", [("all", {"q_proj", "k_proj", "v_proj"}), ("alps_only", {"q_proj"})])
def test_bias_has_peft_meaning_the_base_models_shared_biases(bias, trained, tmp_path):
    """As for LoRA: "all" trains every bias of the model, "alps_only" those of the wrapped projections; they are saved
    with the adapter and reload (PEFT's own code), and only one adapter of a model may have one."""
    model = get_peft_model(tiny_qwen2(), AlpsConfig(target_heads={0: [1]}, target_modules=["q_proj"], bias=bias))
    grads = {n.replace(".base_layer", "").split(".")[-2] for n, p in model.named_parameters()
             if p.requires_grad and n.endswith(".bias")}
    assert grads == trained and not any(".alps_bias." in n for n, _ in model.named_parameters())
    train_steps(model, steps=2)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_qwen2(), tmp_path)), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", AlpsConfig(target_heads={1: [0]}, bias=bias))


def test_bias_heads_is_read_as_alps_bias_and_warns_for_new_configs():
    with pytest.warns(DeprecationWarning, match=r"bias='heads'\) is now AlpsConfig\(alps_bias=True\)"):
        config = AlpsConfig(target_heads={0: [1]}, bias="heads")
    assert (config.bias, config.alps_bias) == ("none", True)


def _drop_bias_field(adapter_dir):
    """Make ``adapter_dir`` look saved by a version before ``bias`` existed (it always trained bias slices)."""
    path = adapter_dir / "adapter_config.json"
    raw = json.loads(path.read_text())
    assert raw.pop("bias") == "none" and raw.pop("alps_bias") is True
    path.write_text(json.dumps(raw))


def test_adapter_saved_before_the_bias_field_loads_as_trained_with_bias_slices(tmp_path):
    from peft import PeftConfig

    model = get_peft_model(tiny_qwen2(), AlpsConfig(target_heads={0: [1], 1: [0, 3]}, alps_bias=True))
    train_steps(model, steps=2)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    _drop_bias_field(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).alps_bias is True  # the generic loader (transformers' load_adapter)
    assert AlpsConfig.from_pretrained(tmp_path).alps_bias is True
    reloaded = PeftModel.from_pretrained(tiny_qwen2(), tmp_path)
    assert (reloaded.peft_config["default"].bias, reloaded.peft_config["default"].alps_bias) == ("none", True)
    assert torch.equal(logits(reloaded), expected)
    assert AlpsConfig(target_heads={0: [1]}).bias == "none"  # a new config without the field is the default


def test_bias_setting_that_does_not_fit_the_saved_weights_is_named(tmp_path):
    model = get_peft_model(tiny_qwen2(), AlpsConfig(target_heads={0: [1]}, alps_bias=True))
    model.save_pretrained(tmp_path / "heads")
    raw = json.loads((tmp_path / "heads" / "adapter_config.json").read_text())
    raw["alps_bias"] = False
    (tmp_path / "heads" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"holds bias deltas \(3 alps_bias tensors.*has alps_bias=false.*\"alps_bias\": true"):
        PeftModel.from_pretrained(tiny_qwen2(), tmp_path / "heads")

    get_peft_model(tiny_qwen2(), AlpsConfig(target_heads={0: [1]})).save_pretrained(tmp_path / "none")
    raw = json.loads((tmp_path / "none" / "adapter_config.json").read_text())
    raw["alps_bias"] = True
    (tmp_path / "none" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"has no bias deltas.*has alps_bias=true.*\"alps_bias\": false"):
        PeftModel.from_pretrained(tiny_qwen2(), tmp_path / "none")


# ----------------------------------------------------------------------------- what may change


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_training_then_merge_changes_only_selected_slices(n_heads, n_kv):
    heads = {0: [1, 5], 2: [6]}
    base = tiny_llama(num_heads=n_heads, num_kv_heads=n_kv)
    before = _weights(base)
    model = get_peft_model(base, AlpsConfig(target_heads=heads))
    train_steps(model, steps=3)
    unmerged = logits(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-5, atol=1e-5)
    after = merged.state_dict()
    assert set(after) == set(before)
    for name, w in before.items():
        changed = (after[name] != w).nonzero()
        parts = name.split(".")
        if "self_attn" in parts and parts[-1] == "weight" and int(parts[2]) in heads:
            axis, allowed = expected_slices(heads[int(parts[2])], n_heads, n_kv, 8)[parts[-2]]
            assert set(changed[:, axis].tolist()) <= allowed, name
            assert changed.numel() > 0, f"{name} did not train"
        else:
            assert changed.numel() == 0, f"{name} changed outside the selected heads"


def test_disable_adapter_gives_base_outputs_and_merge_unmerge_roundtrip():
    base = tiny_llama()
    ref = logits(base)
    model = get_peft_model(base, AlpsConfig(target_heads={0: [0, 4], 1: [7]}, init_weights=False))
    adapted = logits(model)
    assert not torch.allclose(adapted, ref)
    with model.disable_adapter():
        assert torch.equal(logits(model), ref)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), adapted, rtol=1e-5, atol=1e-5)
    unloaded = model.unload()
    torch.testing.assert_close(logits(unloaded), ref, rtol=1e-5, atol=1e-6)


def test_random_init_draws_from_the_global_rng():
    # As LoRA's init_lora_weights=False: two adapters on the same heads differ, and torch.manual_seed reproduces one.
    heads = {0: [0, 4], 1: [7]}
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=heads, init_weights=False))
    torch.manual_seed(3)
    model.add_adapter("b", AlpsConfig(target_heads=heads, init_weights=False))
    torch.manual_seed(3)
    model.add_adapter("c", AlpsConfig(target_heads=heads, init_weights=False))
    deltas = {name: torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith(f".{name}")])
              for name in ("default", "b", "c")}
    assert not torch.equal(deltas["default"], deltas["b"])
    assert torch.equal(deltas["b"], deltas["c"])
    assert 0.01 < deltas["b"].std() < 0.03  # small: the adapted model stays close to the base


def test_forward_never_builds_full_size_delta():
    """Each delta holds only its slices: q/k/v store |rows| x in, o stores out x |cols|."""
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [3]}))
    attn = model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.alps_delta["default"].shape == (8, 64)
    assert attn.k_proj.alps_delta["default"].shape == (8, 64)
    assert attn.o_proj.alps_delta["default"].shape == (64, 8)
    assert attn.o_proj.alps_index["default"].tolist() == list(range(24, 32))


# ----------------------------------------------------------------------------- multiple adapters


def test_add_set_delete_adapters():
    base = tiny_llama()
    ref = logits(base)
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1]}, init_weights=False))
    out_a = logits(model)
    model.add_adapter("b", AlpsConfig(target_heads={1: [2], 2: [5]}, init_weights=False))
    assert logits(model).equal(out_a)  # adding does not activate
    model.set_adapter("b")
    out_b = logits(model)
    assert not torch.allclose(out_b, out_a)
    # only b's parameters train now
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b" in n for n in trainable)
    model.set_adapter("default")
    assert logits(model).equal(out_a)
    model.delete_adapter("default")
    assert "default" not in model.peft_config
    assert model.active_adapters == ["b"]
    assert logits(model).equal(out_b)
    assert not any(".default" in n for n, _ in model.named_parameters())
    model.delete_adapter("b")
    assert not any(".alps_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model.base_model.model), ref)


# ----------------------------------------------------------------------------- save / load


def test_config_roundtrip_through_json(tmp_path):
    cfg = AlpsConfig(target_heads=[(2, 0), (0, 5), (0, 1)], target_modules=["q_proj", "v_proj"])
    assert cfg.target_heads == {0: [1, 5], 2: [0]}
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ALPS" and raw["target_heads"] == {"0": [1, 5], "2": [0]}
    loaded = AlpsConfig.from_pretrained(tmp_path)
    assert loaded.target_heads == {0: [1, 5], 2: [0]}
    assert all(isinstance(k, int) for k in loaded.target_heads)
    assert loaded.target_modules == {"q_proj", "v_proj"}


def test_save_writes_only_deltas(tmp_path):
    heads = {0: [1, 5], 2: [0]}
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=heads))
    train_steps(model, steps=1)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all("alps_delta" in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == n_trainable(model)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert 4 * n_trainable(model) <= size <= 4 * n_trainable(model) + 8192


def test_reload_in_fresh_process_gives_same_outputs(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1, 5], 2: [0]}))
    train_steps(model, steps=3)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(logits(model), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, peft_alps
        from peft import PeftModel, AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        from tests.support.tiny_models import batch
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(model(batch()).logits, expected), "PeftModel.from_pretrained differs"
        auto = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r}).eval()
        with torch.no_grad():
            assert torch.equal(auto(batch()).logits, expected), "AutoPeftModelForCausalLM differs"
        print("OK")
        """
    )
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=_repo_root())
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_half_precision_base_keeps_dtype():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1]}))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert q.alps_delta["default"].dtype == torch.float32  # adapter weights upcast, as PEFT does for LoRA
    train_steps(model, steps=1)
    assert logits(model).dtype == torch.bfloat16
    merged = model.merge_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


# ----------------------------------------------------------------------------- registration


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "body",
    [
        "import peft_alps\nimport peft_alps\nimport importlib\nimportlib.reload(peft_alps)",
        "import peft_alps.layouts\nimport peft_alps.tuner.config\nimport peft_alps",
        "from peft_alps.tuner.config import AlpsConfig\nfrom peft_alps.tuner.registration import ensure_peft_type\n"
        "ensure_peft_type(); ensure_peft_type()\nimport peft_alps",
    ],
    ids=["import-twice-and-reload", "submodule-first", "ensure-twice"],
)
def test_registration_is_idempotent_in_fresh_process(body):
    check = textwrap.dedent(
        """
        from peft.utils import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
        assert [m.value for m in PeftType].count("ALPS") == 1
        assert PeftType("ALPS") is PeftType.ALPS is PeftType["ALPS"]
        assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.ALPS] == "alps_"
        assert PEFT_TYPE_TO_CONFIG_MAPPING["ALPS"].__name__ == "AlpsConfig"
        assert PEFT_TYPE_TO_TUNER_MAPPING["ALPS"].__name__ == "AlpsModel"
        from peft import get_peft_model
        from tests.support.tiny_models import tiny_llama
        import peft_alps
        m = get_peft_model(tiny_llama(), peft_alps.AlpsConfig(target_heads={0: [1]}))
        assert m.peft_type == "ALPS"
        print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", body + "\n" + check], capture_output=True, text=True, cwd=_repo_root()
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_plain_peft_without_import_does_not_know_alps():
    """The enum is only extended by importing peft_alps: a fresh PEFT process is unchanged."""
    code = "from peft.utils import PeftType; assert 'ALPS' not in PeftType.__members__; print('OK')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "target_heads,message",
    [
        ({0: [-1]}, "head index -1 is negative"),
        ({-2: [0]}, "layer index -2 is negative"),
        ({0: []}, r"target_heads\[0\] is empty"),
        ({}, "target_heads is empty"),
        (None, "AlpsConfig needs heads to train"),
        ([(0, 1), (0, 1)], "head 1 of layer 0 is selected twice"),
        ({0: ["x"]}, "head index must be an integer, got 'x'"),
        ([(0, 1, 2)], r"\(layer, head\) pairs"),
    ],
)
def test_bad_target_heads_rejected_at_config_time(target_heads, message):
    with pytest.raises(ValueError, match=message):
        AlpsConfig(target_heads=target_heads)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_heads": {0: [99]}}, r"head 99 out of range: layer 0 has 8 query heads \(0\.\.7\)"),
        ({"target_heads": {3: [0]}}, r"layer 3 out of range: the model has 3 layers \(0\.\.2\)"),
        (
            {"target_heads": {0: [0]}, "target_modules": ["q_proj", "up_proj"]},
            r"module 'model\.layers\.0\.mlp\.up_proj' is not an attention projection",
        ),
        ({"target_heads": {0: [0]}, "target_modules": ["nothing"]}, "matched no attention projection"),
    ],
)
def test_bad_targets_rejected_before_any_module_is_replaced(kwargs, message):
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    structure = [type(m) for m in base.modules()]
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, AlpsConfig(**kwargs))
    assert [type(m) for m in base.modules()] == structure
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_adapter_refused_on_base_with_other_head_layout(tmp_path):
    model = get_peft_model(tiny_llama(num_heads=8, num_kv_heads=2), AlpsConfig(target_heads={0: [1]}))
    model.save_pretrained(tmp_path)
    other = tiny_llama(num_heads=4, num_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match=r"num_heads: adapter 8 vs base 4"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, peft_alps.AlpsLayer) for m in other.modules())


def test_unsupported_model_type_names_supported_families():
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(n_embd=32, n_head=4, n_layer=1, vocab_size=50, rotary_dim=4))
    with pytest.raises(ValueError, match=r"no head layout for model_type 'gptj'.*llama.*register_layout"):
        get_peft_model(model, AlpsConfig(target_heads={0: [0]}))


def test_peft_type_is_alps():
    assert AlpsConfig(target_heads={0: [0]}).peft_type == "ALPS"
