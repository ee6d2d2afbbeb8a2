"""Bad inputs fail early, with a specific exception and a message that names the value and the fix (issue 8).

Each table row is one bad input. Rows that act on a model also check that the model is left exactly as it was
(same state dict, same module types): the error must come before the first module is replaced.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_alps
from peft_alps import AlpsConfig
from tests.support.tiny_models import llama_config, tiny_llama

HEADS = {0: [1, 5], 2: [0]}  # on tiny_llama(): 3 layers, 8 query heads, 2 KV heads, head_dim 8, hidden 64
WEIGHTS = "adapter_model.safetensors"


@dataclass
class Case:
    id: str
    action: Callable
    exc: type[BaseException]
    match: str

    def param(self):
        return pytest.param(self, id=self.id)


# ----------------------------------------------------------------------------- config time (no model needed)

CONFIG_CASES = [
    Case("negative-head", lambda: AlpsConfig(target_heads={0: [-1]}), ValueError, r"head index -1 is negative"),
    Case("negative-layer", lambda: AlpsConfig(target_heads={-3: [0]}), ValueError, r"layer index -3 is negative"),
    Case("duplicate-pair", lambda: AlpsConfig(target_heads=[(1, 2), (0, 0), (1, 2)]), ValueError,
         r"head 2 of layer 1 is selected twice in target_heads; list it once"),
    Case("duplicate-in-list", lambda: AlpsConfig(target_heads={0: [3, 3]}), ValueError,
         r"head 3 of layer 0 is selected twice"),
    Case("duplicate-via-string-key", lambda: AlpsConfig(target_heads={0: [1], "0": [1]}), ValueError,
         r"head 1 of layer 0 is selected twice"),
    Case("empty-dict", lambda: AlpsConfig(target_heads={}), ValueError, r"target_heads is empty"),
    Case("empty-list", lambda: AlpsConfig(target_heads=[]), ValueError, r"target_heads is empty"),
    Case("empty-layer", lambda: AlpsConfig(target_heads={2: []}), ValueError,
         r"target_heads\[2\] is empty: list at least one head for layer 2"),
    Case("missing", lambda: AlpsConfig(), ValueError, r"AlpsConfig needs heads to train: pass target_heads="),
    Case("float-head", lambda: AlpsConfig(target_heads={0: [1.5]}), ValueError,
         r"head index must be an integer, got 1\.5"),
    Case("bool-head", lambda: AlpsConfig(target_heads={0: [True]}), ValueError, r"head index must be an integer, got True"),
    Case("string-heads", lambda: AlpsConfig(target_heads={0: "0,1"}), ValueError,
         r"target_heads\[0\] must be a list of head indices, got '0,1'"),
    Case("triple", lambda: AlpsConfig(target_heads=[(0, 1, 2)]), ValueError, r"must be \(layer, head\) pairs, got \(0, 1, 2\)"),
    Case("not-a-selection", lambda: AlpsConfig(target_heads=7), ValueError, r"got int"),
]


@pytest.mark.parametrize("case", [c.param() for c in CONFIG_CASES])
def test_bad_config(case):
    with pytest.raises(case.exc, match=case.match):
        case.action()


# ----------------------------------------------------------------------------- model state helpers


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(name, type(m)) for name, m in model.named_modules()],
    )


def assert_untouched(model, snap):
    state, modules = snap
    assert [(name, type(m)) for name, m in model.named_modules()] == modules, "a module was replaced"
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key].dtype == value.dtype and now[key].shape == value.shape, f"{key} changed"
        assert value.is_meta or torch.equal(now[key], value), f"{key} changed"


# ----------------------------------------------------------------------------- get_peft_model on a base


GET_PEFT_MODEL_CASES = [
    Case("head-out-of-range", {0: [8]}, ValueError, r"head 8 out of range: layer 0 has 8 query heads \(0\.\.7\)"),
    Case("head-far-out", {1: [2], 2: [99]}, ValueError, r"head 99 out of range: layer 2 has 8 query heads \(0\.\.7\)"),
    Case("layer-out-of-range", {3: [0]}, ValueError, r"layer 3 out of range: the model has 3 layers \(0\.\.2\)"),
    Case("not-attention", ({0: [0]}, ["q_proj", "gate_proj"]), ValueError,
         r"'model\.layers\.0\.mlp\.gate_proj' is not an attention projection.*q_proj"),
    Case("no-match", ({0: [0]}, ["query"]), ValueError, r"matched no attention projection; valid ones are"),
]


@pytest.mark.parametrize("case", [c.param() for c in GET_PEFT_MODEL_CASES])
def test_bad_selection_leaves_model_untouched(case):
    heads, targets = case.action if isinstance(case.action, tuple) else (case.action, None)
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(case.exc, match=case.match):
        get_peft_model(base, AlpsConfig(target_heads=heads, target_modules=targets))
    assert_untouched(base, snap)


def test_stored_head_layout_must_fit_base():
    """A config that records another geometry is refused at get_peft_model time, before injection."""
    cfg = AlpsConfig(target_heads={0: [0]})
    cfg.head_layout = {"model_type": "llama", "num_layers": 3, "num_heads": 8, "num_kv_heads": 8, "head_dim": 8}
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"num_kv_heads: adapter 8 vs base 2.*Load it onto the base model"):
        get_peft_model(base, cfg)
    assert_untouched(base, snap)


# ----------------------------------------------------------------------------- loading a saved adapter


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=HEADS, init_weights=False))
    model.save_pretrained(path)
    return path


def _copy(src: Path, dst: Path, *, config=None, weights=None, raw=None, drop=False):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if raw is not None:
        (dst / WEIGHTS).write_bytes(raw((src / WEIGHTS).read_bytes()))
    elif weights is not None:
        save_file(weights(load_file(src / WEIGHTS)), dst / WEIGHTS)
    elif not drop:
        shutil.copy(src / WEIGHTS, dst / WEIGHTS)
    return dst


def _drop_every_other(sd):
    return {k: v for i, (k, v) in enumerate(sorted(sd.items())) if i % 2}


def _poison(value):
    def fn(sd):
        sd = {k: v.clone() for k, v in sd.items()}
        sd[sorted(sd)[-1]][0, 3] = value
        return sd

    return fn


def _pickle_only(dst: Path):
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.alps_delta": torch.zeros(16, 64)},
               dst / "adapter_model.bin")


LOAD_CASES = [
    # (id, how to damage the adapter, base model kwargs, exception, message)
    Case("truncated-file", dict(raw=lambda b: b[: len(b) // 2]), OSError,
         r"adapter_model\.safetensors is truncated or corrupted \(\d+ bytes.*Re-save the adapter.*download it again"),
    Case("truncated-header", dict(raw=lambda b: b[:5]), OSError, r"adapter_model\.safetensors is truncated or corrupted"),
    Case("corrupted-header", dict(raw=lambda b: b[:8] + b"#" * 40 + b[48:]), OSError,
         r"adapter_model\.safetensors is truncated or corrupted.*invalid JSON"),
    Case("empty-file", dict(raw=lambda b: b""), OSError, r"truncated or corrupted \(0 bytes"),
    Case("no-weights", dict(drop=True), FileNotFoundError,
         r"no adapter_model\.safetensors in .*holds only \['adapter_config\.json'\].*save_pretrained"),
    Case("pickle-only", dict(drop=True, extra=_pickle_only), OSError,
         r"has a pickle adapter_model\.bin but no adapter_model\.safetensors.*never read"),
    Case("partial", dict(weights=_drop_every_other), ValueError,
         r"is missing 4 of the 8 ALPS tensors.*partial.*re-save the adapter"),
    Case("other-target-heads", dict(config={"target_heads": {"0": [1], "2": [0]}}), ValueError,
         r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.alps_delta' has shape \[16, 64\], but the adapter "
         r"config needs \[8, 64\]"),
    Case("extra-layer-in-weights", dict(config={"target_heads": {"0": [1, 5]}}), ValueError,
         r"holds 4 ALPS tensors that its adapter_config\.json does not create.*layers\.2\."),
    Case("nan-weights", dict(weights=_poison(float("nan"))), ValueError, r"has 1 NaN/inf values; the adapter is broken"),
    Case("inf-weights", dict(weights=_poison(float("-inf"))), ValueError, r"has 1 NaN/inf values"),
    Case("head-out-of-range-in-config", dict(config={"target_heads": {"0": [9]}, "head_layout": None}), ValueError,
         r"head 9 out of range: layer 0 has 8 query heads \(0\.\.7\)"),
    Case("no-heads-in-config", dict(config={"target_heads": None}), ValueError, r"AlpsConfig needs heads to train"),
    Case("fewer-layers", dict(base={"layers": 2}), ValueError, r"num_layers: adapter 3 vs base 2"),
    Case("fewer-heads", dict(base={"num_heads": 4, "num_kv_heads": 2}), ValueError, r"num_heads: adapter 8 vs base 4"),
    Case("other-head-dim", dict(base={"head_dim": 16}), ValueError, r"head_dim: adapter 8 vs base 16"),
    Case("other-kv-heads", dict(base={"num_kv_heads": 4}), ValueError, r"num_kv_heads: adapter 2 vs base 4"),
    Case("meta-device-base", dict(base="meta"), ValueError, r"on the meta device.*silently dropped.*real weights"),
]


@pytest.mark.parametrize("case", [c.param() for c in LOAD_CASES])
def test_bad_adapter_fails_before_injection(case, saved_adapter, tmp_path):
    spec = dict(case.action)
    extra, base_kwargs = spec.pop("extra", None), spec.pop("base", {})
    adapter = _copy(saved_adapter, tmp_path / "bad", **spec)
    if extra:
        extra(adapter)
    if base_kwargs == "meta":
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(llama_config())
    else:
        base = tiny_llama(**base_kwargs)
    snap = snapshot(base)
    with pytest.raises(case.exc, match=case.match):
        PeftModel.from_pretrained(base, adapter)
    assert_untouched(base, snap)


@pytest.mark.parametrize("damage,exc,match", [
    (dict(raw=lambda b: b[:-100]), OSError, "truncated or corrupted"),
    (dict(weights=_drop_every_other), ValueError, "is missing 4 of the 8 ALPS tensors"),
], ids=["truncated", "partial"])
def test_bad_adapter_with_low_cpu_mem_usage(damage, exc, match, saved_adapter, tmp_path):
    """PEFT's low_cpu_mem_usage path (adapter weights created on meta, then assigned) is checked the same way."""
    adapter = _copy(saved_adapter, tmp_path / "bad", **damage)
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(exc, match=match):
        PeftModel.from_pretrained(base, adapter, low_cpu_mem_usage=True)
    assert_untouched(base, snap)


def test_bad_adapter_via_load_adapter_leaves_peft_model_as_it_was(saved_adapter, tmp_path):
    """A second adapter that is broken does not touch the PeftModel that already holds a good one."""
    model = PeftModel.from_pretrained(tiny_llama(), saved_adapter)
    snap = snapshot(model)
    bad = _copy(saved_adapter, tmp_path / "bad", raw=lambda b: b[:-100])
    with pytest.raises(OSError, match="truncated or corrupted"):
        model.load_adapter(bad, adapter_name="second")
    assert_untouched(model, snap)
    assert list(model.peft_config) == ["default"]


def test_pickle_is_refused_even_next_to_nothing_else_and_never_opened(saved_adapter, tmp_path):
    """With a pickle present we do not fall back to it, even if torch.load(weights_only=True) would succeed."""
    adapter = _copy(saved_adapter, tmp_path / "bin", drop=True)
    sd = load_file(saved_adapter / WEIGHTS)
    torch.save(sd, adapter / "adapter_model.bin")  # a perfectly valid, harmless pickle
    with pytest.raises(OSError, match=r"loaded only from safetensors"):
        PeftModel.from_pretrained(tiny_llama(), adapter)


# ----------------------------------------------------------------------------- merging broken adapters


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_of_broken_adapter_merges_nothing(how):
    base = tiny_llama()
    weights_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1], 2: [3]}, init_weights=False))
    with torch.no_grad():  # the last wrapped layer is broken, the first ones are fine
        model.base_model.model.model.layers[2].self_attn.v_proj.alps_delta["default"][0, 0] = float("inf")
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"^NaNs detected in the merged weights\. The adapter default seems to be broken: "
                       r"NaNs or infs in the merged weights of 'model\.layers\.2\.self_attn\.v_proj'"):
        getattr(model, how)(safe_merge=True)
    assert [type(m) for m in model.modules()] == modules
    unloaded = model.unload()
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, weights_before[key]), f"{key} was merged although safe_merge failed"


def test_merge_into_meta_weights_is_refused():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(llama_config())
    model = get_peft_model(base, AlpsConfig(target_heads={0: [1]}))
    with pytest.raises(ValueError, match=r"cannot merge ALPS adapter 'default': the base weight is on the meta device"):
        model.merge_adapter()


# ----------------------------------------------------------------------------- dtype combinations that must work


def test_fp16_base_with_fp32_adapter_file(saved_adapter):
    """The common mix-up: an adapter trained/saved in fp32 loaded onto an fp16 base. It loads, keeps the base in
    fp16, computes in fp16 and merges into fp16 weights exactly as the fp32 delta rounded to fp16."""
    saved = load_file(saved_adapter / WEIGHTS)
    assert all(t.dtype == torch.float32 for t in saved.values())
    base = tiny_llama().half()
    q_before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = PeftModel.from_pretrained(base, saved_adapter)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.float16
    assert torch.equal(q.alps_delta["default"].float(), saved["base_model.model.model.layers.0.self_attn.q_proj.alps_delta"])
    x = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert model(x).logits.dtype == torch.float16
    merged = model.merge_and_unload()
    w = merged.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.float16
    rows = [r for h in HEADS[0] for r in range(h * 8, h * 8 + 8)]
    expected = q_before.clone()
    expected[rows] += saved["base_model.model.model.layers.0.self_attn.q_proj.alps_delta"].half()
    assert torch.equal(w, expected)


def test_half_adapter_file_onto_fp32_base_is_upcast_losslessly(saved_adapter, tmp_path):
    adapter = _copy(saved_adapter, tmp_path / "half", weights=lambda sd: {k: v.half() for k, v in sd.items()})
    model = PeftModel.from_pretrained(tiny_llama(), adapter)
    saved = load_file(adapter / WEIGHTS)
    for name, tensor in saved.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        param = getattr(module, name.rsplit(".", 1)[1])["default"]
        assert param.dtype == torch.float32 and torch.equal(param, tensor.float())



# ----------------------------------------------------------------------------- localization and head scores


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A base/task checkpoint pair (3 layers x 8 heads, 2 KV heads) and head scores of a smaller model."""
    from peft_alps import HeadScores, localize_heads

    root = tmp_path_factory.mktemp("ckpt")
    tiny_llama(seed=0).save_pretrained(root / "base")
    tiny_llama(seed=1).save_pretrained(root / "task")
    small = localize_heads(tiny_llama(num_heads=4, num_kv_heads=2, head_dim=16, layers=2, seed=0),
                           tiny_llama(num_heads=4, num_kv_heads=2, head_dim=16, layers=2, seed=1))
    small.save(root / "small.json")
    scores = HeadScores(scores=torch.arange(24.0).reshape(3, 8).numpy(), head_dims={"num_layers": 3, "num_heads": 8})
    scores.save(root / "scores.json")
    return root


def _scores_file(tmp_path, ckpt, **changes):
    data = json.loads((ckpt / "scores.json").read_text())
    data.update(changes)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _load_scores(path):
    from peft_alps import HeadScores

    return HeadScores.load(path)


def _checkpoint(tmp_path, ckpt, edit):
    """A copy of the task checkpoint with ``edit(folder)`` applied."""
    folder = tmp_path / "task"
    shutil.copytree(ckpt / "task", folder)
    edit(folder)
    return folder


def _edit_tensors(fn):
    def edit(folder):
        sd = load_file(folder / "model.safetensors")
        fn(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})

    return edit


def _to_pickle(folder):
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _localize(base, task, **kw):
    from peft_alps import localize_heads

    return localize_heads(base, task, **kw)


def _selection(**kw):
    from peft_alps import HeadScores

    return HeadScores(scores=torch.arange(24.0).reshape(3, 8).numpy()).top_k(**kw)


LOCALIZATION_CASES = [
    # selection size
    Case("ratio-zero", lambda c, t: _selection(ratio=0), ValueError, r"ratio 0 out of range: expected 0 < ratio <= 1"),
    Case("ratio-above-one", lambda c, t: _selection(ratio=1.5), ValueError, r"ratio 1\.5 out of range"),
    Case("ratio-negative", lambda c, t: _selection(ratio=-0.1), ValueError, r"ratio -0\.1 out of range"),
    Case("ratio-bool", lambda c, t: _selection(ratio=True), ValueError, r"ratio True out of range"),
    Case("k-zero", lambda c, t: _selection(k=0), ValueError, r"k=0 out of range: the model has 24 heads, so 1 <= k <= 24"),
    Case("k-above-heads", lambda c, t: _selection(k=25), ValueError, r"k=25 out of range: the model has 24 heads"),
    Case("k-float", lambda c, t: _selection(k=2.5), ValueError, r"k must be an integer number of heads, got 2\.5"),
    Case("ratio-and-k", lambda c, t: _selection(ratio=0.1, k=2), ValueError, r"exactly one of ratio= .* or k="),
    Case("config-ratio-zero", lambda c, t: AlpsConfig(head_scores=str(c / "scores.json"), ratio=0.0), ValueError,
         r"ratio 0\.0 out of range"),
    Case("config-k-too-big", lambda c, t: AlpsConfig(head_scores=str(c / "scores.json"), k=30), ValueError,
         r"k=30 out of range: the model has 24 heads"),
    Case("config-scores-without-ratio", lambda c, t: AlpsConfig(head_scores=str(c / "scores.json")), ValueError,
         r"head_scores needs ratio= .* or k="),
    Case("config-ratio-without-scores", lambda c, t: AlpsConfig(ratio=0.1), ValueError, r"also pass head_scores="),
    Case("config-heads-and-scores", lambda c, t: AlpsConfig(target_heads={0: [1]}, head_scores=str(c / "scores.json"),
                                                            ratio=0.1), ValueError, r"either target_heads or head_scores"),
    # scores files
    Case("scores-missing-file", lambda c, t: _load_scores(t / "nope.json"), OSError, r"head-scores file '.*nope\.json' does not exist"),
    Case("scores-not-json", lambda c, t: (t.joinpath("x.json").write_text("{scores: 1"), _load_scores(t / "x.json")),
         ValueError, r"'.*x\.json' is not valid JSON"),
    Case("scores-not-object", lambda c, t: (t.joinpath("x.json").write_text("[1, 2]"), _load_scores(t / "x.json")),
         ValueError, r"expected a JSON object, got list"),
    Case("scores-other-format", lambda c, t: _load_scores(_scores_file(t, c, format="something-else")), ValueError,
         r"not a peft-alps head-scores file \(format is 'something-else'"),
    Case("scores-future-schema", lambda c, t: _load_scores(_scores_file(t, c, schema_version=2)), ValueError,
         r"schema_version 2 is newer than this peft-alps understands \(up to 1\); upgrade peft-alps"),
    Case("scores-bad-schema", lambda c, t: _load_scores(_scores_file(t, c, schema_version="1")), ValueError,
         r"schema_version must be a positive integer, got '1'"),
    Case("scores-shape-mismatch", lambda c, t: _load_scores(_scores_file(t, c, shape=[2, 8])), ValueError,
         r"'scores' has shape \[3, 8\] but 'shape' says \[2, 8\]"),
    Case("scores-ragged", lambda c, t: _load_scores(_scores_file(t, c, scores=[[1.0, 2.0], [3.0]], shape=[2, 2])),
         ValueError, r"'scores' must be a list of rows of numbers"),
    Case("scores-nan", lambda c, t: _load_scores(_scores_file(t, c, scores=[[0.0] * 8, [float("nan")] * 8, [0.0] * 8])),
         ValueError, r"score of head 0 in layer 1 is nan; scores must be finite"),
    Case("scores-dims-disagree", lambda c, t: _load_scores(_scores_file(t, c, head_dims={"num_layers": 5})), ValueError,
         r"head_dims\['num_layers'\] = 5 does not match the scores' shape \[3, 8\]"),
    # metric, variant, temperature
    Case("unknown-metric", lambda c, t: _localize(c / "base", c / "task", metric="w1"), ValueError,
         r"unknown metric 'w1'; choose one of wasserstein, kl, js, cosine, euclidean"),
    Case("unknown-variant", lambda c, t: _localize(c / "base", c / "task", variant="qk"), ValueError,
         r"unknown variant 'qk'; choose one of qkv_product, qkv_concat"),
    Case("tau-zero", lambda c, t: _localize(c / "base", c / "task", tau=0), ValueError, r"tau must be a positive finite number.*got 0"),
    Case("tau-negative", lambda c, t: _localize(c / "base", c / "task", tau=-1.0), ValueError, r"got -1\.0"),
    Case("tau-nan", lambda c, t: _localize(c / "base", c / "task", tau=float("nan")), ValueError, r"got nan"),
    Case("tau-inf", lambda c, t: _localize(c / "base", c / "task", tau=float("inf")), ValueError, r"got inf"),
    # base/task pairs that do not match
    Case("pair-layers", lambda c, t: _localize(c / "base", tiny_llama(layers=2)), ValueError,
         r"do not have the same attention geometry \(num_layers: base 3 vs task 2\)"),
    Case("pair-heads", lambda c, t: _localize(c / "base", tiny_llama(num_heads=4, num_kv_heads=2, head_dim=16)),
         ValueError, r"num_heads: base 8 vs task 4"),
    Case("pair-head-dim", lambda c, t: _localize(c / "base", tiny_llama(head_dim=16)), ValueError, r"head_dim: base 8 vs task 16"),
    Case("pair-kv-heads", lambda c, t: _localize(c / "base", tiny_llama(num_kv_heads=4)), ValueError,
         r"num_kv_heads: base 2 vs task 4"),
    Case("pair-hidden", lambda c, t: _localize(c / "base", tiny_llama(hidden_size=32)), ValueError,
         r"differ in hidden size \(64 vs 32\)"),
    # weights and checkpoints
    Case("nan-in-checkpoint", lambda c, t: _localize(c / "base", _checkpoint(t, c, _edit_tensors(
        lambda sd: sd["model.layers.1.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan"))))),
         ValueError, r"'model\.layers\.1\.self_attn\.q_proj\.weight' of .* has 1 NaN/inf value"),
    Case("inf-in-model", lambda c, t: _localize(c / "base", _inf_model()), ValueError,
         r"model\.layers\.2\.self_attn\.v_proj\.weight.*has 2 NaN/inf value"),
    Case("missing-path", lambda c, t: _localize(c / "base", t / "no-such-model"), OSError,
         r"checkpoint folder '.*no-such-model' does not exist"),
    Case("file-not-folder", lambda c, t: _localize(c / "base", c / "task" / "model.safetensors"), OSError,
         r"is a file; pass the checkpoint folder"),
    Case("no-config", lambda c, t: _localize(c / "base", _checkpoint(t, c, lambda f: (f / "config.json").unlink())),
         OSError, r"has no config\.json"),
    Case("pickle-checkpoint", lambda c, t: _localize(c / "base", _checkpoint(t, c, _to_pickle)), OSError,
         r"has no \*\.safetensors files \(found \['pytorch_model\.bin'\]\)"),
    Case("partial-checkpoint", lambda c, t: _localize(c / "base", _checkpoint(t, c, _edit_tensors(
        lambda sd: sd.pop("model.layers.2.self_attn.k_proj.weight")))), ValueError,
         r"lacks the attention tensors that localization needs: missing 'model\.layers\.2\.self_attn\.k_proj\.weight'"),
    Case("truncated-checkpoint", lambda c, t: _localize(c / "base", _checkpoint(t, c, lambda f: (
        f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-1000]))), OSError,
         r"checkpoint file '.*model\.safetensors' is truncated or corrupted.*download or save the checkpoint again"),
]


def _inf_model():
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.model.layers[2].self_attn.v_proj.weight[3, :2] = float("inf")
    return model


@pytest.mark.parametrize("case", [c.param() for c in LOCALIZATION_CASES])
def test_bad_localization_input(case, ckpt, tmp_path):
    with pytest.raises(case.exc, match=case.match):
        case.action(ckpt, tmp_path)


def test_scores_of_another_model_are_refused_before_injection(ckpt):
    cfg = AlpsConfig(head_scores=str(ckpt / "small.json"), ratio=0.5)  # 2 layers x 4 heads: all heads in range
    base = tiny_llama()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"selected from head scores of another model .*small\.json.*num_layers: "
                                         r"scores 2 vs base 3; num_heads: scores 4 vs base 8.*Localize the base model"):
        get_peft_model(base, cfg)
    assert_untouched(base, snap)


def test_localization_leaves_in_memory_models_untouched(ckpt):
    base, task = tiny_llama(seed=0), _inf_model()
    snaps = snapshot(base), snapshot(task)
    with pytest.raises(ValueError, match="NaN/inf"):
        _localize(base, task)
    assert_untouched(base, snaps[0])
    assert_untouched(task, snaps[1])  # (inf == inf, so the planted infs compare equal)
