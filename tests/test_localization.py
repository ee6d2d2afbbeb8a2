"""Head localization: PAD scores against an independent scipy oracle, ranking, selection, files, errors."""

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.special import softmax
from scipy.stats import wasserstein_distance

from peft import PeftModel, get_peft_model
from peft_alps import AlpsConfig, HeadScores, localize_heads, select_layer_consistent, select_random
from tests.support.tiny_models import tiny_llama


def _pair(num_heads=8, num_kv_heads=2, layers=3, seed=0, noise=0.02):
    """A base model and a 'task' model: every weight nudged a little (so no score is exactly zero)."""
    base = tiny_llama(num_heads=num_heads, num_kv_heads=num_kv_heads, layers=layers, seed=seed)
    task = tiny_llama(num_heads=num_heads, num_kv_heads=num_kv_heads, layers=layers, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return base, task


def _oracle(base, task, variant, tau):
    """Per-head W1 written from the method text, with numpy/scipy only: no code shared with the package."""
    cfg = base.config
    n, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = np.zeros((cfg.num_hidden_layers, n))
    for layer in range(cfg.num_hidden_layers):
        def weights(model):
            attn = model.model.layers[layer].self_attn
            return [getattr(attn, f"{x}_proj").weight.detach().double().numpy() for x in "qkv"]

        per_model = []
        for q, k, v in (weights(base), weights(task)):
            mats = []
            for h in range(n):
                kv = h // (n // g)
                wq, wk, wv = q[h * d : (h + 1) * d], k[kv * d : (kv + 1) * d], v[kv * d : (kv + 1) * d]
                if variant == "qkv_product":
                    mats.append((wq.T @ wk @ wv.T).ravel())
                else:
                    mats.append(np.concatenate([wq.ravel(), wk.ravel(), wv.ravel()]))
            per_model.append(mats)
        for h in range(n):
            p_b, p_t = softmax(per_model[0][h] / tau), softmax(per_model[1][h] / tau)
            x = np.arange(p_b.size) / (p_b.size - 1)
            out[layer, h] = wasserstein_distance(u_values=x, v_values=x, u_weights=p_b, v_weights=p_t)
    return out


@pytest.mark.parametrize("num_kv_heads", [2, 8], ids=["gqa", "mha"])
@pytest.mark.parametrize("variant", ["qkv_product", "qkv_concat"])
def test_scores_match_scipy_oracle(num_kv_heads, variant):
    base, task = _pair(num_kv_heads=num_kv_heads)
    tau = 0.5 if variant == "qkv_product" else 1.0
    s = localize_heads(base, task, variant=variant, tau=tau)
    assert isinstance(s.scores, np.ndarray) and s.scores.dtype == np.float64 and s.scores.shape == (3, 8)
    expected = _oracle(base, task, variant, tau)
    assert (expected > 0).all()
    np.testing.assert_allclose(s.scores, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["overflow", "underflow"])
def test_softmax_needing_the_max_shift_matches_the_oracle(case):
    """The scorer exponentiates without the max shift when that is exact enough; when ``exp`` would overflow
    (huge logits) or every entry is tiny (very negative logits), it must fall back to the shifted softmax."""
    base, task = _pair(layers=2)
    if case == "underflow":  # every q/k/v weight far below zero: exp(x / tau) ~ 0 everywhere
        for model in (base, task):
            with torch.no_grad():
                for layer in model.model.layers:
                    for name in ("q_proj", "k_proj", "v_proj"):
                        getattr(layer.self_attn, name).weight.sub_(8.0)
        variant, tau = "qkv_concat", 0.01
    else:
        variant, tau = "qkv_product", 2e-7  # entries (up to ~7e-4) / tau reach far beyond exp's float64 range (709)
    s = localize_heads(base, task, variant=variant, tau=tau)
    expected = _oracle(base, task, variant, tau)
    assert np.isfinite(s.scores).all() and (expected > 0).all()
    np.testing.assert_allclose(s.scores, expected, rtol=1e-6, atol=0)


def _perturb_q(model, heads, scale=0.5):
    d = model.config.head_dim
    with torch.no_grad():
        for layer, head in heads:
            w = model.model.layers[layer].self_attn.q_proj.weight
            w[head * d : (head + 1) * d] += scale * torch.randn_like(w[head * d : (head + 1) * d])


@pytest.mark.parametrize("metric", ["wasserstein", "kl", "js", "cosine", "euclidean"])
def test_perturbed_heads_rank_first(metric):
    base, task = _pair(noise=0.002)
    _perturb_q(task, [(0, 5), (2, 1)])
    s = localize_heads(base, task, metric=metric)
    assert s.metric == metric
    assert s.top_k(k=2) == {0: [5], 2: [1]}
    assert set(s.ranking()[:2]) == {(0, 5), (2, 1)}


def test_identical_models_score_zero_and_folders_equal_models(tmp_path):
    base, task = _pair()
    assert not localize_heads(base, base).scores.any()
    assert not localize_heads(base, base, variant="qkv_concat").scores.any()
    base.save_pretrained(tmp_path / "b")
    task.save_pretrained(tmp_path / "t")
    from_models = localize_heads(base, task)
    from_folders = localize_heads(tmp_path / "b", str(tmp_path / "t"))
    assert from_folders.scores.tobytes() == from_models.scores.tobytes()
    assert from_folders.base == str(tmp_path / "b") and from_folders.model_type == "llama"
    assert from_folders.head_dims == {"num_layers": 3, "num_heads": 8, "num_kv_heads": 2, "head_dim": 8}


def test_bitwise_identical_across_thread_counts(monkeypatch):
    import peft_alps.localization.pad as localization

    monkeypatch.setattr(localization, "PARALLEL_MIN_LAYER_WEIGHTS", 0)  # worker threads even for a tiny model
    base, task = _pair(layers=2)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for variant in ("qkv_product", "qkv_concat"):
                results.append(localize_heads(base, task, variant=variant).scores.tobytes())
    finally:
        torch.set_num_threads(previous)
    assert results[:2] == results[2:]
    assert torch.get_num_threads() == previous


def test_attention_only_and_sharded_checkpoints(tmp_path):
    base, task = _pair()
    base.save_pretrained(tmp_path / "base")
    full = load_file(tmp_path / "base" / "model.safetensors")
    # task checkpoint: config.json + only the attention tensors, split over two shards with an index
    task.save_pretrained(tmp_path / "full_task")
    attn = {k: v for k, v in load_file(tmp_path / "full_task" / "model.safetensors").items() if ".self_attn." in k}
    assert len(attn) < len(full)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "config.json").write_text((tmp_path / "full_task" / "config.json").read_text())
    names = sorted(attn)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: attn[k] for k in keys}, tmp_path / "task" / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "task" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert localize_heads(tmp_path / "base", tmp_path / "task").scores.tobytes() == localize_heads(base, task).scores.tobytes()


def test_hub_repo_from_offline_cache_fetches_only_attention_shards(tmp_path, monkeypatch):
    """A Hub id resolved from the HF cache (HF_HUB_OFFLINE=1): the non-attention shard is not even cached."""
    import huggingface_hub.constants

    base, task = _pair()
    task.save_pretrained(tmp_path / "full")
    tensors = load_file(tmp_path / "full" / "model.safetensors")
    snapshot = tmp_path / "cache" / "models--org--task" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "cache" / "models--org--task" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--task" / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    attn = {k: v for k, v in tensors.items() if ".self_attn." in k}
    save_file(attn, snapshot / "attn.safetensors")
    weight_map = {k: ("attn.safetensors" if k in attn else "rest.safetensors") for k in tensors}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    s = localize_heads(base, "org/task")
    assert s.task == "org/task"
    assert s.scores.tobytes() == localize_heads(base, task).scores.tobytes()
    with pytest.raises(OSError, match="org/absent"):
        localize_heads(base, "org/absent")


def _expected_k(ratio, total):
    return math.ceil(Fraction(str(ratio)) * total)


def test_top_k_counts_and_order():
    rng = np.random.default_rng(0)
    for layers, heads in [(3, 8), (16, 32), (5, 12), (1, 1)]:
        s = HeadScores(rng.random((layers, heads)))
        total = layers * heads
        for ratio in (0.01, 0.1, 0.25, 1 / 3, 0.3, 0.5, 0.7, 1.0):
            sel = s.top_k(ratio)
            pairs = [(layer, h) for layer, hs in sel.items() for h in hs]
            assert len(pairs) == len(set(pairs)) == _expected_k(ratio, total)
            chosen = np.zeros_like(s.scores, dtype=bool)
            for layer, h in pairs:
                chosen[layer, h] = True
            if not chosen.all():
                assert s.scores[chosen].min() > s.scores[~chosen].max()
            assert all(hs == sorted(hs) for hs in sel.values()) and list(sel) == sorted(sel)
        assert sum(map(len, s.top_k(k=total).values())) == total
    assert HeadScores(np.zeros((2, 2))).top_k(k=2) == {0: [0, 1]}  # ties: lower layer, then lower head


def test_baseline_selections():
    r = select_random(4, 8, ratio=0.25, seed=3)
    assert sum(map(len, r.values())) == 8 and r == select_random(4, 8, ratio=0.25, seed=3)
    assert r != select_random(4, 8, ratio=0.25, seed=4)
    lc = select_layer_consistent(4, 8, k=8, seed=1)
    assert sorted(lc) == [0, 1, 2, 3] and all(len(h) == 2 and len(set(h)) == 2 for h in lc.values())
    assert {len(h) for h in HeadScores(np.ones((4, 8))).layer_consistent(0.1, seed=0).values()} == {1}


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"ratio {bad}.*0 < ratio <= 1"):
        HeadScores(np.ones((2, 4))).top_k(bad)


def test_k_out_of_range():
    with pytest.raises(ValueError, match="k=9 out of range.*8 heads"):
        HeadScores(np.ones((2, 4))).top_k(k=9)


def test_json_round_trip_and_validation(tmp_path):
    base, task = _pair(layers=2)
    s = localize_heads(base, task, metric="js", variant="qkv_concat", tau=2.0)
    path = s.save(tmp_path / "heads.json")
    back = HeadScores.load(path)
    assert back.scores.tobytes() == s.scores.tobytes()
    assert (back.metric, back.variant, back.tau, back.head_dims) == ("js", "qkv_concat", 2.0, s.head_dims)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["shape"] == [2, 8]

    def broken(name, content):
        p = tmp_path / name
        p.write_text(content if isinstance(content, str) else json.dumps(content))
        return p

    with pytest.raises(ValueError, match="not valid JSON"):
        HeadScores.load(broken("a.json", "{oops"))
    with pytest.raises(ValueError, match="schema_version 99 is newer.*upgrade"):
        HeadScores.load(broken("b.json", {**data, "schema_version": 99}))
    with pytest.raises(ValueError, match=r"shape \[2, 8\] but 'shape' says \[3, 8\]"):
        HeadScores.load(broken("c.json", {**data, "shape": [3, 8]}))
    with pytest.raises(ValueError, match="not a peft-alps head-scores file"):
        HeadScores.load(broken("d.json", {"weight_map": {}}))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['scores'\]"):
        HeadScores.load(broken("e.json", {k: v for k, v in data.items() if k != "scores"}))
    with pytest.raises(OSError, match="nope.json"):
        HeadScores.load(tmp_path / "nope.json")


def test_alps_config_resolves_head_scores(tmp_path):
    base, task = _pair()
    _perturb_q(task, [(1, 6), (2, 0), (0, 3)], scale=1.0)
    s = localize_heads(base, task)
    path = s.save(tmp_path / "heads.json")
    cfg = AlpsConfig(head_scores=str(path), ratio=0.1)  # ceil(0.1 * 24) = 3 heads
    assert cfg.target_heads == {0: [3], 1: [6], 2: [0]} == s.top_k(ratio=0.1)
    assert cfg.head_scores is None and cfg.head_selection["head_scores"] == str(path)
    assert AlpsConfig(head_scores=s, k=1).target_heads == s.top_k(k=1)

    model = get_peft_model(base, cfg)
    model.save_pretrained(tmp_path / "adapter")
    path.unlink()  # the saved adapter must not need the scores file
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_heads"] == {"0": [3], "1": [6], "2": [0]} and saved["head_scores"] is None
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert reloaded.peft_config["default"].target_heads == {0: [3], 1: [6], 2: [0]}

    with pytest.raises(ValueError, match="ratio= .* or k="):
        AlpsConfig(head_scores=s)
    with pytest.raises(ValueError, match="either target_heads or head_scores"):
        AlpsConfig(head_scores=s, ratio=0.1, target_heads={0: [1]})
    with pytest.raises(ValueError, match="ratio 2.0 out of range"):
        AlpsConfig(head_scores=s, ratio=2.0)
    with pytest.raises(ValueError, match="k=25 out of range"):
        AlpsConfig(head_scores=s, k=25)
    with pytest.raises(ValueError, match="also pass head_scores"):
        AlpsConfig(target_heads={0: [1]}, ratio=0.1)
    with pytest.raises(OSError, match="missing.json"):
        AlpsConfig(head_scores=str(tmp_path / "missing.json"), ratio=0.1)


@pytest.mark.parametrize(
    "other, what",
    [
        (dict(layers=2), "num_layers: base 3 vs task 2"),
        (dict(num_heads=4, num_kv_heads=2), "num_heads: base 8 vs task 4"),
        (dict(num_kv_heads=4), "num_kv_heads: base 2 vs task 4"),
        (dict(head_dim=4), "head_dim: base 8 vs task 4"),
    ],
)
def test_geometry_mismatch(other, what):
    kw = dict(num_heads=8, num_kv_heads=2, layers=3)
    kw.update(other)
    with pytest.raises(ValueError, match=what):
        localize_heads(tiny_llama(), tiny_llama(**kw))


def test_missing_path_and_bad_inputs(tmp_path):
    with pytest.raises(OSError, match="does_not_exist"):
        localize_heads(tiny_llama(), tmp_path / "does_not_exist")
    with pytest.raises(OSError, match="does_not_exist"):
        localize_heads(str(tmp_path / "does_not_exist"), tiny_llama())
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        localize_heads(tiny_llama(), tiny_llama(), metric="l1")
    with pytest.raises(ValueError, match="unknown variant 'qk'"):
        localize_heads(tiny_llama(), tiny_llama(), variant="qk")
    with pytest.raises(ValueError, match="tau must be a positive.*-1"):
        localize_heads(tiny_llama(), tiny_llama(), tau=-1)


def test_non_finite_weights_are_named(tmp_path):
    task = tiny_llama()
    with torch.no_grad():
        task.model.layers[2].self_attn.k_proj.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*NaN/inf"):
        localize_heads(tiny_llama(), task)
    task.model.layers[2].self_attn.k_proj.weight.data[3, 4] = float("-inf")
    task.save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*NaN/inf"):
        localize_heads(tiny_llama(), tmp_path / "t", variant="qkv_concat")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_finite_check(dtype, tmp_path):
    """The NaN/inf check is a plain sum in the stored dtype: a float16 row sum of large finite weights must not
    overflow into a false alarm, and one -inf weight is still found and named (in a folder read row by row)."""
    base = tiny_llama().to(dtype)
    task = tiny_llama().to(dtype)
    with torch.no_grad():
        task.model.layers[1].self_attn.q_proj.weight[:, :].fill_(6e4 if dtype == torch.float16 else 3e38)
    base.save_pretrained(tmp_path / "b")
    task.save_pretrained(tmp_path / "t")
    scores = localize_heads(tmp_path / "b", tmp_path / "t", variant="qkv_concat", tau=1e5 if dtype == torch.float16 else 1e38)
    assert np.isfinite(scores.scores).all() and scores.scores[1].min() > scores.scores[0].max()
    with torch.no_grad():
        task.model.layers[0].self_attn.v_proj.weight[2, 5] = float("-inf")
    task.save_pretrained(tmp_path / "t2")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight.*1 NaN/inf value"):
        localize_heads(tmp_path / "b", tmp_path / "t2", variant="qkv_concat")


def test_checkpoint_without_attention_tensors_is_named(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "t")
    tensors = load_file(tmp_path / "t" / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, tmp_path / "t" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        localize_heads(base, tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no \*\.safetensors files"):
        localize_heads(base, tmp_path / "t")


def test_heatmap_is_a_png(tmp_path):
    s = HeadScores(np.arange(24, dtype=float).reshape(3, 8))
    path = s.heatmap(tmp_path / "h.png", ratio=0.1)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ every registered family

from tests.test_architectures import FAMILIES, IDS  # noqa: E402


def _family_qkv(model, fam, layer):
    """Per-head q and per-group k/v slices ([out, in] orientation), from the family's storage as the
    architecture tests describe it (not from the layout registry)."""
    n, g, d = fam.n, fam.g, fam.d
    mods = dict(model.named_modules())
    q = k = v = None
    for path, kind in fam.proj.items():
        name = next(m for m in mods if m.endswith(f"{fam.block}.{layer}.{path}"))
        w = mods[name].weight.detach().double().numpy()
        w = w.T if fam.transposed else w
        if kind == "q":
            q = w.reshape(n, d, -1)
        elif kind == "k":
            k = w.reshape(g, d, -1)
        elif kind == "v":
            v = w.reshape(g, d, -1)
        elif kind == "concat":
            q, k, v = w[: n * d].reshape(n, d, -1), w[n * d : (n + g) * d].reshape(g, d, -1), w[(n + g) * d :].reshape(g, d, -1)
        elif kind == "grouped":
            blocks = w.reshape(g, n // g + 2, d, -1)
            q, k, v = blocks[:, : n // g].reshape(n, d, -1), blocks[:, n // g], blocks[:, n // g + 1]
    return q, k, v


def _family_oracle(base, task, fam, variant):
    n, g = fam.n, fam.g
    layers = sum(1 for m, _ in base.named_modules() if re.search(rf"(^|\.){fam.block}\.\d+$", m))
    out = np.zeros((layers, n))
    for layer in range(layers):
        mats = []
        for model in (base, task):
            q, k, v = _family_qkv(model, fam, layer)
            per_head = []
            for h in range(n):
                j = h // (n // g)
                per_head.append((q[h].T @ k[j] @ v[j].T).ravel() if variant == "qkv_product"
                                else np.concatenate([q[h].ravel(), k[j].ravel(), v[j].ravel()]))
            mats.append(per_head)
        for h in range(n):
            p_b, p_t = softmax(mats[0][h]), softmax(mats[1][h])
            x = np.arange(p_b.size) / (p_b.size - 1)
            out[layer, h] = wasserstein_distance(u_values=x, v_values=x, u_weights=p_b, v_weights=p_t)
    return out


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_every_family_matches_the_oracle_from_folders(fam, tmp_path):
    base, task = fam.build(0), fam.build(0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    base.save_pretrained(tmp_path / "b")
    task.save_pretrained(tmp_path / "t")
    for variant in ("qkv_product", "qkv_concat"):
        s = localize_heads(tmp_path / "b", tmp_path / "t", variant=variant)
        np.testing.assert_allclose(s.scores, _family_oracle(base, task, fam, variant), rtol=1e-6, atol=0)
        if variant == "qkv_product":  # the in-memory path reads the same weights
            assert localize_heads(base, task, variant=variant).scores.tobytes() == s.scores.tobytes()


def test_bnb_4bit_model_is_dequantized_layer_by_layer(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.support.tiny_models import llama_config

    cfg = llama_config(num_heads=8, num_kv_heads=4, head_dim=8)  # bnb's CPU kernels: rows % 32, cols % 64
    cfg.intermediate_size = 128
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q4 = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    # reference: a plain model holding bitsandbytes' own dequantization of each 4-bit weight
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for name, module in q4.named_modules():
            if isinstance(module, bnb.nn.Linear4bit) and "self_attn" in name:
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                ref.get_submodule(name).weight.copy_(w)
    s = localize_heads(tmp_path / "base", q4)
    assert s.scores.any()
    assert s.scores.tobytes() == localize_heads(tmp_path / "base", ref).scores.tobytes()


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = line.rstrip().endswith(str(path))
        elif current and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_read_rows_are_released_so_memory_does_not_grow_with_the_model(tmp_path):
    """Rows of a checkpoint folder are views of its memory map; release() must drop their pages, or a whole
    model's q/k/v would end up resident (8 layers x 3 MiB here)."""
    from peft_alps.localization.sources.open import open_source
    from peft_alps.localization.pad import HeadGroup

    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=128, vocab_size=64)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    path = (tmp_path / "m" / "model.safetensors").resolve()
    qkv_kib = 8 * (1024 + 256 + 256) * 1024 * 2 // 1024  # 24 MiB of q/k/v rows in bf16
    with open_source(tmp_path / "m") as source:
        def read_all(release: bool) -> int:
            for layer in range(8):
                for group in range(2):
                    HeadGroup(source, layer, group, "base")
                    if release:
                        source.release()
            return _mapped_rss_kib(path)

        kept = read_all(release=False)
        source.release()
        released = read_all(release=True)
    assert kept >= qkv_kib * 0.9  # the control: without release() every row read stays resident
    assert released <= 3 * 2048  # at most the last group's 2 MiB windows (q, k, v)
