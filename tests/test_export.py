"""Exact export of ALPS adapters to standard PEFT LoRA adapters (issue: QLoRA, LoRA, export)."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_alps import AlpsConfig, export_to_lora

VOCAB = 61
HEADS = {0: [1, 2], 2: [0]}  # layer 1 untouched; layer 0 heads 1 and 2 share KV group 0 when g = 2


def build(family, seed=0):
    """Tiny models of the families with distinct export cases, with n query heads, g KV groups, head_dim 8."""
    common = dict(vocab_size=VOCAB)
    if family == "llama":  # separate q/k/v/o, GQA
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "qwen2":  # q/k/v biases -> lora_bias
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "phi3":  # fused qkv_proj
        cfg = transformers.Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **common)
    elif family == "gpt2":  # Conv1D (fan_in_fan_out), fused c_attn, biases everywhere
        cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def alps_model(family, heads=HEADS, **kw):
    model = get_peft_model(build(family), AlpsConfig(target_heads=heads, init_weights=False, **kw))
    with torch.no_grad():  # give every slice, biases included, distinct non-zero values
        for name, p in model.named_parameters():
            if ".alps_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model


def ids(seed=1):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def logits(model, x=None):
    model.eval()
    with torch.no_grad():
        return model(ids() if x is None else x).logits


# ----------------------------------------------------------------------------- independent oracle


def expected_rows(family, proj, heads, n=4, g=2, d=8):
    """Rows (q/k/v/fused qkv) or columns (o) of the selected heads, written from the transformers code."""
    if family == "gpt2":
        g = n
    groups = sorted({h // (n // g) for h in heads})
    q = [i for h in heads for i in range(h * d, (h + 1) * d)]
    kv = [i for k in groups for i in range(k * d, (k + 1) * d)]
    if proj in ("q_proj", "o_proj", "c_proj"):
        return q
    if proj in ("k_proj", "v_proj"):
        return kv
    # fused [q heads | k groups | v groups]
    return sorted(q + [n * d + i for i in kv] + [n * d + g * d + i for i in kv])


def test_factors_are_selection_times_slice(tmp_path):
    model = alps_model("llama")
    with pytest.warns(UserWarning, match=r"layers='owned': only 8 of the 12 .*LoRAX and TGI drop every projection "
                                         r"type.*Export with layers='all'"):
        export_to_lora(model, tmp_path, layers="owned")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    sd = load_file(tmp_path / "adapter_model.safetensors")
    deltas = {n.removeprefix("base_model.model.").removesuffix(".alps_delta.default"): p.detach()
              for n, p in model.named_parameters() if ".alps_delta." in n}
    # q of layer 0: 2 heads x 8 rows = 16; k/v: one group = 8; o: 16 columns -> one rank 16 for all
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 16
    assert not config["rank_pattern"] and not config["alpha_pattern"] and config["lora_bias"] is False
    assert sorted(config["target_modules"]) == sorted(deltas)
    assert set(sd) == {f"base_model.model.{m}.lora_{ab}.weight" for m in deltas for ab in "AB"}
    for module, delta in deltas.items():
        layer, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        index = expected_rows("llama", proj, HEADS[layer])
        a, b = sd[f"base_model.model.{module}.lora_A.weight"], sd[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 16
        full = torch.zeros(b.shape[0], a.shape[1])
        if proj == "o_proj":
            full[:, index] = delta
        else:
            full[index] = delta
        assert torch.equal(b @ a, full), module  # exact: one-hot products only copy numbers


def test_per_module_ranks_write_patterns(tmp_path):
    model = alps_model("llama")
    with pytest.warns(UserWarning, match=r"PEFT and vLLM apply rank_pattern/alpha_pattern per module.*llama\.cpp "
                                         r"applies the one global lora_alpha=16"):
        export_to_lora(model, tmp_path, per_module_ranks=True, layers="owned")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {
        f"model.layers.{layer}.self_attn.{proj}": len(expected_rows("llama", proj, heads))
        for layer, heads in HEADS.items()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert config["rank_pattern"] == expected and config["alpha_pattern"] == expected
    assert config["r"] == config["lora_alpha"] == max(expected.values())
    sd = load_file(tmp_path / "adapter_model.safetensors")
    for module, r in expected.items():
        assert sd[f"base_model.model.{module}.lora_A.weight"].shape[0] == r


@pytest.mark.parametrize("family, projections", [
    ("llama", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    ("phi3", ("self_attn.qkv_proj", "self_attn.o_proj")),
])
def test_complete_export_has_every_layer_at_one_rank_with_exact_zeros(family, projections, tmp_path):
    model = alps_model(family)
    with warnings_as_errors():  # the complete form is served by every engine: nothing to warn about
        export_to_lora(model, tmp_path / "all")
    with pytest.warns(UserWarning, match="layers='owned'"):
        export_to_lora(model, tmp_path / "owned", layers="owned")
    config = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    sd = load_file(tmp_path / "all" / "adapter_model.safetensors")
    owned = load_file(tmp_path / "owned" / "adapter_model.safetensors")
    bare = sorted(p.rsplit(".", 1)[1] for p in projections)
    assert sorted(config["target_modules"]) == bare and config["r"] == config["lora_alpha"]
    every = {f"base_model.model.model.layers.{layer}.{p}" for layer in range(3) for p in projections}
    assert set(sd) == {f"{m}.lora_{ab}.weight" for m in every for ab in "AB"}
    assert {sd[k].shape[0] for k in sd if "lora_A" in k} == {config["r"]} == {sd[k].shape[1] for k in sd if "lora_B" in k}
    for key, tensor in sd.items():
        if key in owned:
            assert torch.equal(tensor, owned[key]), key  # the owned modules: the same exact factors
        else:
            assert int(key.split(".")[4]) not in HEADS and torch.count_nonzero(tensor) == 0, key  # exact zeros


def test_complete_export_writes_q_k_v_together(tmp_path):
    """SGLang stacks q, k and v per layer: an adapter that targets only q still exports all three."""
    model = alps_model("llama", target_modules=["q_proj"])
    export_to_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert len(sd) == 3 * 3 * 2 and all(torch.count_nonzero(v) == 0 for k, v in sd.items() if "q_proj" not in k)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(build("llama"), tmp_path)), logits(model),
                               rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=r"SGLang raises on a layer with q but not v"):
        export_to_lora(model, tmp_path / "owned", layers="owned")


def test_gpt2_complete_export_names_the_attention_c_proj_only(tmp_path):
    """GPT-2 has c_proj in attention and in the MLP: a bare name would also adapt the MLP's."""
    model = alps_model("gpt2")
    export_to_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attn.c_proj", "c_attn"]
    lora = PeftModel.from_pretrained(build("gpt2"), tmp_path)
    assert not any("mlp" in n for n, _ in lora.named_modules() if n.endswith("lora_A"))
    torch.testing.assert_close(logits(lora), logits(model), rtol=1e-5, atol=1e-6)


def test_layer_form_and_pattern_options_are_checked_first(tmp_path):
    model = alps_model("llama")
    with pytest.raises(ValueError, match=r"layers='every' is not valid; use 'all'.*or 'owned'"):
        export_to_lora(model, tmp_path / "x", layers="every")
    with pytest.raises(ValueError, match=r"per_module_ranks=True .* pass layers='owned' with it"):
        export_to_lora(model, tmp_path / "x", per_module_ranks=True)
    assert not (tmp_path / "x").exists()


def test_padded_rank_gives_same_outputs(tmp_path):
    model = alps_model("llama")
    expected = logits(model)
    export_to_lora(model, tmp_path, rank=40)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 40
    lora = PeftModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(logits(lora), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- fresh process, plain PEFT


FAMILIES = ["llama", "qwen2", "phi3", "gpt2"]
BIASED = ["qwen2", "gpt2"]  # bases whose attention projections have biases
PATTERN_WARNING = r"llama\.cpp applies the one global lora_alpha=\d+ to every module"
BIAS_WARNING = r'alps_bias=True.*"vLLM does not support LoRA bias".*"Not a lora_A or lora_B tensor"'

RELOAD_WITHOUT_PEFT_ALPS = textwrap.dedent(
    """
    import sys, json, torch
    from pathlib import Path
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    root = Path(sys.argv[1])
    x = torch.load(root / "ids.pt", weights_only=True)
    for family, mode, merge in json.loads(sys.argv[2]):
        expected = torch.load(root / family / f"expected_{mode}.pt", weights_only=True)
        base = AutoModelForCausalLM.from_pretrained(root / family / "base").eval()
        model = PeftModel.from_pretrained(base, root / family / mode).eval()
        assert model.peft_config["default"].peft_type == "LORA"
        with torch.no_grad():
            got = model(x).logits
        print(f"{family}/{mode}: max abs diff {(got - expected).abs().max().item():.3g}")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{family}/{mode}")
        if merge:
            merged = model.merge_and_unload()
            with torch.no_grad():
                torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5,
                                           msg=f"{family}/{mode} merged")
    assert not any(m == "peft_alps" or m.startswith("peft_alps.") for m in sys.modules), "peft_alps imported"
    print("OK", len(json.loads(sys.argv[2])))
    """
)


def test_default_exports_have_no_bias_and_reload_exactly_without_peft_alps(tmp_path):
    """Every family, Qwen2 and GPT-2 included: the default adapter (bias="none") exports without lora_bias and
    without any bias tensor, and plain PEFT in a process that never imports peft_alps reproduces the ALPS logits,
    unmerged and merged. An alps_bias=True adapter of the biased families still reloads exactly (unmerged)."""
    cases = []
    x = ids(seed=7)
    torch.save(x, tmp_path / "ids.pt")
    for family in FAMILIES:
        build(family).save_pretrained(tmp_path / family / "base")
        model = alps_model(family)
        assert not any(".alps_bias." in n for n, _ in model.named_parameters())
        for mode, kw, warning in (("complete", {}, None), ("owned", {"layers": "owned"}, "layers='owned'"),
                                  ("per_module", {"per_module_ranks": True, "layers": "owned"}, PATTERN_WARNING)):
            torch.save(logits(model, x), tmp_path / family / f"expected_{mode}.pt")
            with pytest.warns(UserWarning, match=warning) if warning else warnings_as_errors():
                export_to_lora(model, tmp_path / family / mode, **kw)
            config = json.loads((tmp_path / family / mode / "adapter_config.json").read_text())
            keys = load_file(tmp_path / family / mode / "adapter_model.safetensors")
            assert config["lora_bias"] is False and config["bias"] == "none"
            assert not [k for k in keys if "bias" in k], f"{family}/{mode}"
            cases.append((family, mode, True))
        if family in BIASED:
            heads = alps_model(family, alps_bias=True)
            torch.save(logits(heads, x), tmp_path / family / "expected_heads.pt")
            with pytest.warns(UserWarning, match=BIAS_WARNING):
                export_to_lora(heads, tmp_path / family / "heads")
            cases.append((family, "heads", False))  # Qwen2's o_proj has no base bias, so PEFT cannot merge it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_PEFT_ALPS, str(tmp_path), json.dumps(cases)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0 and f"OK {len(cases)}" in result.stdout, result.stdout + result.stderr[-3000:]
    print(result.stdout)


@pytest.mark.parametrize("family", BIASED)
def test_bias_heads_export_warns_and_writes_biases_only_where_there_are_bias_deltas(family, tmp_path):
    model = alps_model(family, alps_bias=True)
    with pytest.warns(UserWarning, match=BIAS_WARNING) as caught:
        export_to_lora(model, tmp_path)
    assert "alps_bias=False" in str(caught[0].message)  # the way out
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    sd = load_file(tmp_path / "adapter_model.safetensors")
    with_bias = {n.removeprefix("base_model.model.").removesuffix(".alps_bias.default")
                 for n, _ in model.named_parameters() if ".alps_bias." in n}
    written = {k.removeprefix("base_model.model.").removesuffix(".lora_B.bias") for k in sd if k.endswith(".bias")}
    assert written == with_bias and with_bias  # q/k/v (or c_attn) only: never a zero o_proj/c_proj bias
    assert not any(m.endswith(("o_proj", "c_proj")) for m in written)
    for module in written:
        layer, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        rows = set(expected_rows(family, proj, HEADS[layer]))
        assert set(sd[f"base_model.model.{module}.lora_B.bias"].nonzero().flatten().tolist()) <= rows


def test_gpt2_export_uses_fan_in_fan_out_and_fused_rows(tmp_path):
    model = alps_model("gpt2")
    export_to_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is False
    sd = load_file(tmp_path / "adapter_model.safetensors")
    a = sd["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    rows = expected_rows("gpt2", "c_attn", HEADS[0])
    assert a.shape == (len(rows), 32) and b.shape == (96, len(rows))
    assert torch.equal(b.abs().sum(1).nonzero().flatten(), torch.tensor(rows))  # only the fused q/k/v head rows


# ----------------------------------------------------------------------------- what serving engines check


def _pattern_value(pattern, module):
    """PEFT's rule for rank_pattern/alpha_pattern keys: a key matches a module name it ends with at a "." boundary
    (the keys written here are full module names); the first match wins."""
    return next((value for key, value in pattern.items() if module == key or module.endswith("." + key)), None)


def serving_problems(adapter_dir, max_lora_rank=512, num_layers=3):
    """What vLLM's PEFTHelper / LoRA loader, llama.cpp's convert_lora_to_gguf.py + runtime, LoRAX's and TGI's
    ``load_batched_adapter_weights`` and SGLang's q/k/v stacking would object to, written from what their code does
    (not from their code): ``{"vllm": [...], "llama.cpp": [...], "lorax/tgi": [...], "sglang": [...]}``."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    vllm, llama = [], []
    for field in ("r", "lora_alpha", "target_modules"):  # vLLM's required fields
        if field not in config:
            vllm.append(f"missing {field}")
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not (isinstance(r, int) and r > 0):
        vllm.append(f"r={r!r} is not a positive integer")
    if max([r, *ranks.values()]) > max_lora_rank:
        vllm.append(f"rank {max([r, *ranks.values()])} > max_lora_rank {max_lora_rank}")
    if config.get("lora_bias"):
        vllm.append("does not support LoRA bias")
    if config.get("bias", "none") != "none":
        vllm.append("adapter bias is not supported")
    if config.get("use_dora"):
        vllm.append("DoRA")
    if set(config.get("modules_to_save") or []) - {"classifier", "score"}:
        vllm.append(f"modules_to_save={config['modules_to_save']}")
    if isinstance(config.get("init_lora_weights", True), str) and config["init_lora_weights"].lower() in (
        "pissa", "olora", "corda", "loftq"
    ):
        vllm.append("init_lora_weights changes the base weights")

    pairs = {}
    for name, tensor in tensors.items():
        for side in ("lora_A", "lora_B"):
            if name.startswith("base_model.model.") and name.endswith(f".{side}.weight"):
                pairs.setdefault(name.removeprefix("base_model.model.").removesuffix(f".{side}.weight"), {})[side] = tensor
                break
        else:
            vllm.append(f"{name} is an unsupported LoRA weight")
            llama.append(f"{name}: Not a lora_A or lora_B tensor")
    targets = set(config["target_modules"]) if isinstance(config["target_modules"], list) else None
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            vllm.append(f"{module} lacks one of lora_A/lora_B")
            llama.append(f"{module} lacks one of lora_A/lora_B")
            continue
        if targets is not None and not any(module == t or module.endswith("." + t) for t in targets):
            vllm.append(f"{module} is not in target_modules")
        rank = pair["lora_A"].shape[0]
        if pair["lora_B"].shape[1] != rank:
            vllm.append(f"{module}: lora_A rank {rank} != lora_B rank {pair['lora_B'].shape[1]}")
            continue
        peft_rank = _pattern_value(ranks, module) or r
        peft_alpha = _pattern_value(alphas, module)
        peft_scale = (alpha if peft_alpha is None else peft_alpha) / peft_rank  # what PEFT and vLLM apply
        if rank != peft_rank:
            vllm.append(f"{module}: tensors of rank {rank}, config says {peft_rank}")
        if alpha / rank != peft_scale:  # llama.cpp: the global lora_alpha over the tensor's own rank
            llama.append(f"{module}: llama.cpp scales by {alpha}/{rank}, PEFT by {peft_scale}")
    return {"vllm": vllm, "llama.cpp": llama, **layer_problems(pairs, num_layers)}


def layer_problems(pairs, num_layers):
    """LoRAX / TGI: a projection type with no weights in some layer is dropped for every layer (the adapter then
    serves the base model there, with only a log line). SGLang: within a layer, q, k and v come together."""
    have: dict[str, set[int]] = {}
    for module in pairs:
        parts = module.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        have.setdefault(parts[-1], set()).add(layer)
    lorax = [f"{proj} dropped: layer {min(set(range(num_layers)) - layers)} has none"
             for proj, layers in sorted(have.items()) if set(range(num_layers)) - layers]
    sglang = []
    for layer in range(num_layers):
        qkv = {p for p in ("q_proj", "k_proj", "v_proj") if layer in have.get(p, set())}
        if qkv and len(qkv) < 3:
            sglang.append(f"layer {layer} has {sorted(qkv)} without the rest of q/k/v")
    return {"lorax/tgi": lorax, "sglang": sglang}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_export_passes_what_every_engine_checks(family, tmp_path):
    export_to_lora(alps_model(family), tmp_path)
    assert serving_problems(tmp_path) == {"vllm": [], "llama.cpp": [], "lorax/tgi": [], "sglang": []}


def test_owned_export_is_what_lorax_tgi_and_sglang_do_not_serve(tmp_path):
    with pytest.warns(UserWarning, match="layers='owned'"):
        export_to_lora(alps_model("llama"), tmp_path / "owned", layers="owned")
    found = serving_problems(tmp_path / "owned")
    assert found["vllm"] == [] and found["llama.cpp"] == [] and found["sglang"] == []
    assert found["lorax/tgi"] == [f"{p} dropped: layer 1 has none" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    with pytest.warns(UserWarning, match="SGLang raises"):
        export_to_lora(alps_model("llama", target_modules=["q_proj", "k_proj"]), tmp_path / "qk", layers="owned")
    assert serving_problems(tmp_path / "qk")["sglang"] == ["layer 0 has ['k_proj', 'q_proj'] without the rest of q/k/v",
                                                          "layer 2 has ['k_proj', 'q_proj'] without the rest of q/k/v"]


def test_serving_check_catches_what_the_engines_refuse(tmp_path):
    with pytest.warns(UserWarning, match=PATTERN_WARNING):
        export_to_lora(alps_model("llama"), tmp_path / "pm", per_module_ranks=True, layers="owned")
    found = serving_problems(tmp_path / "pm")
    assert found["vllm"] == []  # vLLM applies rank_pattern / alpha_pattern per module
    assert found["llama.cpp"] and all("llama.cpp scales by 16/8" in p for p in found["llama.cpp"])  # k/v: rank 8

    with pytest.warns(UserWarning, match=BIAS_WARNING):
        export_to_lora(alps_model("qwen2", alps_bias=True), tmp_path / "bias")
    found = serving_problems(tmp_path / "bias")
    assert "does not support LoRA bias" in found["vllm"]
    assert any("lora_B.bias: Not a lora_A or lora_B tensor" in p for p in found["llama.cpp"])

    model = get_peft_model(build("llama"), AlpsConfig(target_heads=HEADS, modules_to_save=["lm_head"]))
    with pytest.warns(UserWarning, match="modules_to_save"):
        export_to_lora(model, tmp_path / "mts")
    found = serving_problems(tmp_path / "mts")
    assert "modules_to_save=['lm_head']" in found["vllm"] and found["llama.cpp"]


# ----------------------------------------------------------------------------- errors


def test_rank_too_small_fails_before_anything_is_written(tmp_path):
    model = alps_model("llama")
    out = tmp_path / "lora"
    with pytest.raises(ValueError, match=r"rank 8 is too small .*model\.layers\.0\.self_attn\.(q|o)_proj needs rank 16.*"
                                         r"Pass rank>=16.*Nothing was written"):
        export_to_lora(model, out, rank=8)
    assert not out.exists()
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            export_to_lora(model, out, rank=bad)
    assert not out.exists()


def test_rank_beyond_vllm_limit_warns_and_caps(tmp_path):
    # one layer, 8 heads of 80 dims: selecting all heads needs 640 q rows, more than vLLM's 512
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=8,
                                   num_key_value_heads=8, head_dim=80, vocab_size=VOCAB)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg), AlpsConfig(target_heads={0: list(range(8))}))
    with pytest.raises(ValueError, match=r"rank 512 is too small .*needs rank 640"):
        export_to_lora(model, tmp_path / "capped", rank=512)
    assert not (tmp_path / "capped").exists()
    with pytest.warns(UserWarning, match=r"rank 640: vLLM serves ranks up to 512"):
        export_to_lora(model, tmp_path / "big")
    with pytest.warns(UserWarning, match=r"rank 640: vLLM serves ranks up to 512"):  # vLLM checks rank_pattern too
        export_to_lora(model, tmp_path / "patterns", per_module_ranks=True, layers="owned")


def test_export_refuses_other_adapters():
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="is a LORA adapter; export_to_lora exports ALPS adapters"):
        export_to_lora(model, "/nonexistent/never-written")
    model = alps_model("llama")
    with pytest.raises(ValueError, match=r"adapter 'other' not found; this model has \['default'\]"):
        export_to_lora(model, "/nonexistent/never-written", adapter_name="other")
    with pytest.raises(ValueError, match="either rank=.* or per_module_ranks=True"):
        export_to_lora(model, "/nonexistent/never-written", rank=16, per_module_ranks=True)


def test_owned_export_has_only_layers_with_heads(tmp_path):
    with pytest.warns(UserWarning, match="layers='owned'"):
        export_to_lora(alps_model("phi3"), tmp_path, layers="owned")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{layer}.self_attn.{p}" for layer in HEADS for p in ("qkv_proj", "o_proj")
    )


def test_modules_to_save_are_carried_over(tmp_path):
    model = get_peft_model(build("llama"), AlpsConfig(target_heads=HEADS, modules_to_save=["lm_head"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(ids(), labels=ids()).loss.backward()
    opt.step()
    expected = logits(model)
    with pytest.warns(UserWarning, match=r"modules_to_save=\['lm_head'\]"):
        export_to_lora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    lora = PeftModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(logits(lora), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits(build("llama")), expected)  # the trained head matters for the outputs
