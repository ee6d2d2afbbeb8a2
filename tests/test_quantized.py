"""ALPS on bitsandbytes 4-bit / 8-bit bases (issue: QLoRA, LoRA, export), on CPU.

The tiny model has every quantized weight a multiple of 64 wide and 32 tall, as bitsandbytes' CPU kernels need.
"""

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

import peft_alps
from peft_alps import AlpsConfig
from peft_alps.tuner.quantization import dequantized_weight, restore_4bit_layout
from tests.support.tiny_models import batch, llama_config

bnb = pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig  # noqa: E402

HEADS = {0: [1, 6], 2: [3]}  # layer 1 has no selected head
N_HEADS, N_KV, D = 8, 4, 8  # GQA, group size 2
LAYER_CLS = {"4bit": lambda: bnb.nn.Linear4bit, "8bit": lambda: bnb.nn.Linear8bitLt}


def quant_config(bits):
    if bits == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def save_base(path, num_heads=N_HEADS, num_kv_heads=N_KV, head_dim=D):
    cfg = llama_config(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    cfg.intermediate_size = 128
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base"))


def load(path, bits, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config(bits), **kw)


def logits(model, x=None):
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(batch() if x is None else x).logits


def train(model, steps=3, lr=1e-2):
    x = batch(seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


def attn(model, layer):
    return model.get_base_model().model.layers[layer].self_attn


def selected_rows(proj, heads):
    """Independently written: the [out, in] rows (q/k/v) or columns (o) of one layer's selected heads."""
    kv = {h // (N_HEADS // N_KV) for h in heads}
    own = heads if proj in ("q_proj", "o_proj") else kv
    return sorted(i for h in own for i in range(h * D, (h + 1) * D))


# ----------------------------------------------------------------------------- train, save, reload


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_alps_trains_on_quantized_base_and_reloads(bits, base_dir, tmp_path):
    model = prepare_model_for_kbit_training(load(base_dir, bits), use_gradient_checkpointing=True)
    model = get_peft_model(model, AlpsConfig(target_heads=HEADS))
    q = attn(model, 0).q_proj
    assert isinstance(q, peft_alps.AlpsLayer) and isinstance(q.base_layer, LAYER_CLS[bits]())
    assert q.quantization_backend.backend_name == f"bnb {bits}"
    assert type(attn(model, 1).q_proj) is LAYER_CLS[bits]()  # no selected head: not wrapped
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with model.disable_adapter():
        ref = logits(model)
    assert torch.equal(logits(model), ref)  # zero deltas: identity on the quantized base

    train(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, ref)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "alps_delta" in name and p.abs().sum() > 0, name
        else:
            assert torch.equal(p, frozen[name]), f"{name} changed"  # quantized base bytes untouched

    model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(load(base_dir, bits), tmp_path / "adapter")
    assert isinstance(attn(fresh, 0).q_proj.base_layer, LAYER_CLS[bits]())
    torch.testing.assert_close(logits(fresh), adapted, rtol=0, atol=1e-5)


def _grads(model, x):
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x, labels=x).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def test_gradient_checkpointing_gives_the_same_gradients_on_4bit(base_dir):
    x = batch(seed=5)
    plain_base = prepare_model_for_kbit_training(load(base_dir, "4bit"), use_gradient_checkpointing=False)
    torch.manual_seed(0)  # init_weights=False draws from the global RNG: the same deltas in both models
    plain = get_peft_model(plain_base, AlpsConfig(target_heads=HEADS, init_weights=False))
    ckpt_base = prepare_model_for_kbit_training(load(base_dir, "4bit"), use_gradient_checkpointing=True)
    assert ckpt_base.is_gradient_checkpointing
    torch.manual_seed(0)
    ckpt = get_peft_model(ckpt_base, AlpsConfig(target_heads=HEADS, init_weights=False))
    expected, got = _grads(plain, x), _grads(ckpt, x)
    assert set(got) == set(expected) and len(got) == 8  # q/k/v/o deltas of layers 0 and 2
    for name in expected:
        assert expected[name].abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_gradients_survive_an_inference_pass_on_4bit_cpu(base_dir):
    """bitsandbytes repacks CPU 4-bit weights on the first no-grad eval forward, and that layout has no backward.
    ALPS keeps the repacking off, so training after an evaluation gets the same gradients as before it."""
    model = get_peft_model(load(base_dir, "4bit"), AlpsConfig(target_heads=HEADS, init_weights=False))
    x = batch(seed=5)
    before = _grads(model, x)
    logits(model)  # eval + no_grad: where the repacking would happen
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    after = _grads(model, x)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_already_repacked_4bit_weight_is_restored(base_dir):
    base = load(base_dir, "4bit")
    layer = base.model.layers[0].self_attn.q_proj
    expected = dequantized_weight(layer)
    logits(base)  # may repack the weight for AVX512-BF16 CPUs
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU/bitsandbytes does not repack 4-bit weights for inference")
    assert restore_4bit_layout(layer)
    # the repacking stored the block scales in bf16; that rounding (2^-8 relative) is all that may differ
    torch.testing.assert_close(dequantized_weight(layer), expected, rtol=2**-7, atol=0)


# ----------------------------------------------------------------------------- merge


def _quant_tolerance(bits, target):
    """Largest rounding error of re-quantizing ``target`` ([out, in], float): half the widest gap between
    adjacent NF4 levels (0.152 of the block's absmax) for 4-bit blocks of 64; half a step (absmax/127) per row
    for 8-bit, plus the 8-bit dequantizer's own rounding (it scales by an approximate 1/127)."""
    if bits == "4bit":
        blocks = target.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        return (0.16 * blocks).expand(-1, 64).reshape(target.shape)
    return (0.6 * target.abs().amax(dim=1, keepdim=True) / 127).expand(target.shape)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_merge_into_quantized_weight_requantizes_with_warning(bits, base_dir):
    model = get_peft_model(load(base_dir, bits), AlpsConfig(target_heads=HEADS, init_weights=False))
    with model.disable_adapter():
        base_out = logits(model)
    adapted = logits(model)
    layers = {
        name: module
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, LAYER_CLS[bits]())
    }
    before = {name: dequantized_weight(m) for name, m in layers.items()}
    deltas = {
        name.removesuffix(".base_layer"): model.get_base_model()
        .get_submodule(name.removesuffix(".base_layer"))
        .get_delta_weight("default")
        .detach()
        for name, m in layers.items()
        if name.endswith(".base_layer")
    }
    with pytest.warns(UserWarning, match=rf"ALPS adapter 'default' into a bnb {bits} layer .* rounding"):
        merged = model.merge_and_unload(safe_merge=True)  # safe path: every slice checked before merging
    assert not any(isinstance(m, peft_alps.AlpsLayer) for m in merged.modules())

    checked = 0
    for name, w in before.items():
        key = name.removesuffix(".base_layer")
        module = merged.get_submodule(key)
        assert isinstance(module, LAYER_CLS[bits]()), f"{key} is no longer quantized"
        after = dequantized_weight(module)
        if key not in deltas:
            assert torch.equal(after, w), f"{key} changed but has no adapter"
            continue
        target = w + deltas[key]
        assert (after - target).abs().le(_quant_tolerance(bits, target) + 1e-6).all(), key
        layer, proj = int(key.split(".")[2]), key.rsplit(".", 1)[1]
        index = selected_rows(proj, HEADS[layer])
        if proj != "o_proj":
            # row slices: every other row is re-quantized with its old scale, so it comes back bit for bit
            others = [i for i in range(w.shape[0]) if i not in index]
            assert torch.equal(after[others], w[others]), f"{key} changed outside the selected rows"
            assert not torch.equal(after[index], w[index]), f"{key}: selected rows did not change"
        checked += 1
    assert checked == 8
    merged_out = logits(merged)
    # the merge applies the delta: far closer to the adapted model than the base is
    assert (merged_out - adapted).norm() < 0.5 * (base_out - adapted).norm()


# ----------------------------------------------------------------------------- errors and dispatch


def test_adapter_refused_on_quantized_base_with_other_head_layout(tmp_path):
    trained = get_peft_model(
        load(save_base(tmp_path / "a"), "4bit"), AlpsConfig(target_heads={0: [1]}, init_weights=False)
    )
    trained.save_pretrained(tmp_path / "adapter")
    other = load(save_base(tmp_path / "b", num_heads=4, num_kv_heads=2, head_dim=16), "4bit")
    structure = [type(m) for m in other.modules()]
    weights = copy.deepcopy({k: v for k, v in other.state_dict().items()})
    with pytest.raises(ValueError, match=r"num_heads: adapter 8 vs base 4; num_kv_heads: adapter 4 vs base 2"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    assert [type(m) for m in other.modules()] == structure
    assert all(torch.equal(weights[k], v) for k, v in other.state_dict().items())


def test_dispatch_follows_peft_layer_types():
    from peft_alps.tuner.layer import dispatch_linear

    assert dispatch_linear(torch.nn.Linear(64, 32)) is peft_alps.Linear
    assert dispatch_linear(bnb.nn.Linear4bit(64, 32)) is peft_alps.Linear
    assert dispatch_linear(bnb.nn.Linear8bitLt(64, 32)) is peft_alps.Linear
    assert dispatch_linear(torch.nn.Embedding(10, 4)) is None
    assert dispatch_linear(torch.nn.Conv2d(3, 3, 1)) is None


# ----------------------------------------------------------------------------- localization


def test_localization_of_in_memory_4bit_models(tmp_path, base_dir):
    """Head scores of 4-bit in-memory models equal those of float models holding the dequantized weights, also
    after an inference pass (which repacks CPU 4-bit weights), and rank the perturbed head first."""
    from peft_alps import localize_heads

    task = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        rows = torch.tensor(selected_rows("q_proj", [5]))
        q = task.model.layers[1].self_attn.q_proj.weight
        q[rows] += 0.5 * torch.randn(q[rows].shape, generator=torch.Generator().manual_seed(3))
    task.save_pretrained(tmp_path / "task")
    base4, task4 = load(base_dir, "4bit"), load(tmp_path / "task", "4bit")

    def float_copy(quantized, path):
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            for name, module in quantized.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    weight = module.weight
                    model.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
        return model

    expected = localize_heads(float_copy(base4, base_dir), float_copy(task4, tmp_path / "task")).scores
    got = localize_heads(base4, task4)
    assert got.ranking()[0] == (1, 5)
    assert abs(got.scores - expected).max() <= 1e-9 * abs(expected).max()

    logits(base4), logits(task4)  # eval + no_grad: bitsandbytes may repack the CPU weights here
    after = localize_heads(base4, task4)
    assert after.ranking()[0] == (1, 5)
    # the repacking rounds block scales to bf16 (2^-8 relative); scores move by about that much, not more
    assert abs(after.scores - expected).max() <= 0.05 * abs(expected).max()


def test_export_from_4bit_training_serves_as_lora_on_the_4bit_base(base_dir, tmp_path):
    from peft_alps import export_to_lora
    from peft_alps.tuner.quantization import keep_cpu_4bit_trainable

    model = get_peft_model(load(base_dir, "4bit"), AlpsConfig(target_heads=HEADS, init_weights=False))
    expected = logits(model)
    export_to_lora(model, tmp_path / "lora")
    fresh = load(base_dir, "4bit")
    keep_cpu_4bit_trainable(fresh)  # same CPU kernel as the ALPS model, so only the adapter path differs
    lora = PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert lora.peft_config["default"].peft_type == "LORA"
    assert isinstance(attn(lora, 0).q_proj.base_layer, bnb.nn.Linear4bit)
    torch.testing.assert_close(logits(lora), expected, rtol=1e-5, atol=1e-5)
