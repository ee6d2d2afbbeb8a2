"""Localizing Hub repos by HTTP Range reads of their q/k/v bytes (issue 16), against a real HTTP server.

The real ``huggingface_hub`` client talks to :class:`benchmarks.hub_server.HubServer` on 127.0.0.1 (``HF_ENDPOINT``
pointed at it, offline mode off only inside these tests), which counts the body bytes of every request. The
checkpoints are sharded bf16 Llamas whose q/k/v tensors are ~5% of the bytes (big MLP and embeddings).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_alps import localize_heads
from peft_alps.localization.sources.hub_cache import attention_cache_root
from benchmarks.hub_server import HubServer, commit_of

LAYERS = 4
QKV = ("q_proj", "k_proj", "v_proj")


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=256, intermediate_size=2048, num_hidden_layers=LAYERS, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=32, vocab_size=4096, max_position_embeddings=64,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Base and task checkpoints (6 shards each) and their local-folder scores."""
    root = tmp_path_factory.mktemp("pair")
    for seed, name in enumerate(("base", "task")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config()).to(torch.bfloat16)
        model.save_pretrained(root / name, max_shard_size="4MB")
    return root / "base", root / "task", localize_heads(root / "base", root / "task")


def _sizes(folder: Path) -> dict[str, int]:
    """Bytes of one checkpoint by kind: its q/k/v tensors, its safetensors headers, config + index, everything."""
    qkv = headers = total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        total += shard.stat().st_size
        with open(shard, "rb") as fh:
            headers += 8 + int.from_bytes(fh.read(8), "little")
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if any(f"self_attn.{p}.weight" in name for p in QKV):
                    qkv += f.get_slice(name).get_shape()[0] * f.get_slice(name).get_shape()[1] * 2
    meta = (folder / "config.json").stat().st_size + (folder / "model.safetensors.index.json").stat().st_size
    return {"qkv": qkv, "headers": headers, "meta": meta, "total": total}


@pytest.fixture
def hub(tmp_path, monkeypatch, pair):
    """A server with org/base and org/task (whose ``main`` is the base itself and ``sft`` the task), and
    huggingface_hub pointed at it with an empty cache."""
    base, task, _ = pair
    server = HubServer({"org/base": {"main": base}, "org/task": {"main": base, "sft": task}})
    with server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def _tensor_bytes(server: HubServer) -> int:
    """Body bytes of the ranged reads other than the safetensors headers (their 8-byte length, then the JSON)."""
    return server.sent(lambda r: r.status == 206 and not r.range.startswith(("bytes=0-", "bytes=8-")))


def _layer_files(repo_id: str, commit: str) -> list[Path]:
    folder = attention_cache_root() / f"models--{repo_id.replace('/', '--')}" / commit
    return sorted(folder.glob("layer-*.safetensors"))


@pytest.mark.parametrize("redirect", [False, True], ids=["direct", "redirected-to-storage"])
def test_scores_equal_the_folders_and_only_qkv_bytes_are_read(hub, pair, redirect):
    base, task, local = pair
    hub.redirect = redirect
    scores = localize_heads("org/base", "org/task", task_revision="sft")
    assert scores.scores.tobytes() == local.scores.tobytes()
    assert (scores.base, scores.task) == ("org/base", "org/task@sft")

    b, t = _sizes(base), _sizes(task)
    qkv = b["qkv"] + t["qkv"]
    assert qkv < 0.06 * (b["total"] + t["total"])  # attention is a small share of these checkpoints
    assert _tensor_bytes(hub) == qkv  # exactly the q/k/v bytes (the o_proj between k and q is skipped)
    api = hub.sent(lambda r: r.path.startswith("/api/"))
    assert hub.sent() <= 1.25 * qkv + b["headers"] + t["headers"] + b["meta"] + t["meta"] + api
    assert not [r for r in hub.log if r.range is None and r.path.endswith(".safetensors")]  # no whole shard
    assert all("peft-alps/" in r.user_agent for r in hub.log if r.range)  # huggingface_hub's headers, ours added
    assert any(r.status == 302 for r in hub.log) == redirect  # (Range survives the redirect to the storage URL)

    # a second run reads no file at all: only the revision is resolved (model info, two small JSON answers)
    hub.clear()
    again = localize_heads("org/base", "org/task", task_revision="sft")
    assert again.scores.tobytes() == local.scores.tobytes()
    assert [r.path for r in hub.log] == ["/api/models/org/base", "/api/models/org/task/revision/sft"]
    # pinned to commits, nothing at all
    hub.clear()
    pinned = localize_heads("org/base", "org/task", revision=commit_of("org/base", "main"),
                            task_revision=commit_of("org/task", "sft"))
    assert pinned.scores.tobytes() == local.scores.tobytes() and hub.log == []


def test_offline_uses_the_attention_cache_and_names_what_is_missing(hub, pair, monkeypatch):
    _, _, local = pair
    localize_heads("org/base", "org/task", task_revision="sft")
    hub.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    scores = localize_heads("org/base", "org/task", task_revision="sft")
    assert scores.scores.tobytes() == local.scores.tobytes() and hub.log == []
    with pytest.raises(OSError, match=r"'org/task' is not a local folder, and Hub repo 'org/task@v2' is not in the "
                                      r"local cache; HF_HUB_OFFLINE=1 is set, so nothing can be downloaded"):
        localize_heads("org/base", "org/task", task_revision="v2")
    assert hub.log == []


def test_a_dropped_connection_resumes_at_the_first_missing_layer(hub, pair, monkeypatch):
    base, task, local = pair
    per_layer = _sizes(base)["qkv"] // LAYERS
    metadata = 2 * (_sizes(base)["headers"] + _sizes(base)["meta"])
    hub.drop_after = metadata + int(2.5 * per_layer)  # in the middle of the second model's layer ~1
    with pytest.raises(OSError, match=r"reading the q/k/v bytes of layer \d of Hub repo 'org/(base|task@sft)' "
                                      r"failed \(OSError: the connection broke after .*\)\. The \d of 4 layers read "
                                      r"completely are cached in .*; run the same localization again to resume"):
        localize_heads("org/base", "org/task", task_revision="sft")
    cached = {repo: len(_layer_files(repo, commit_of(repo, rev))) for repo, rev in (("org/base", "main"),
                                                                                   ("org/task", "sft"))}
    assert 0 < sum(cached.values()) < 2 * LAYERS

    # offline, the error says how much is cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    short = next(repo for repo, count in cached.items() if count < LAYERS)  # the first one that fails offline
    with pytest.raises(OSError, match=rf"\({cached[short]} of 4 layers of its q/k/v tensors are in .*: the rest "
                                      rf"needs 0.\d MB\); HF_HUB_OFFLINE=1 is set"):
        localize_heads("org/base", "org/task", task_revision="sft")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    hub.clear()
    scores = localize_heads("org/base", "org/task", task_revision="sft")
    assert scores.scores.tobytes() == local.scores.tobytes()
    missing = 2 * LAYERS - sum(cached.values())
    assert _tensor_bytes(hub) == missing * per_layer  # only the layers that were missing
    assert not [r for r in hub.log if r.range in ("bytes=0-7",)]  # the manifest (headers) was cached too


def test_a_server_without_range_support_falls_back_to_whole_shards_with_one_warning(hub, pair):
    base, task, local = pair
    hub.ranges = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = localize_heads("org/base", "org/task", task_revision="sft")
    assert scores.scores.tobytes() == local.scores.tobytes()
    ours = [w for w in caught if "does not support HTTP Range" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "falls back to downloading every safetensors shard that holds q/k/v tensors whole" in str(ours[0].message)
    whole = {r.path.rsplit("/", 1)[1] for r in hub.log if r.method == "GET" and r.range is None and r.status == 200}
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with_qkv = {file for name, file in weight_map.items() if any(f"{p}.weight" in name for p in QKV)}
    assert with_qkv <= whole and len(with_qkv) < len(set(weight_map.values()))  # (not the embedding-only shards)

    # with Range back, the shards now in the Hugging Face cache are read from there: no file from the network
    hub.ranges = True
    hub.clear()
    scores = localize_heads("org/base", "org/task", task_revision="sft")
    assert scores.scores.tobytes() == local.scores.tobytes()
    assert [r.path for r in hub.log] == ["/api/models/org/base", "/api/models/org/task/revision/sft"]


def test_a_pickle_only_repo_is_refused_and_never_downloaded(hub, pair, tmp_path):
    from tests.test_safe_loading import _Planted

    base, _, _ = pair
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((base / "config.json").read_bytes())
    marker = tmp_path / "code-ran"
    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Planted(str(marker))}, f)
    hub.repos["org/pickled"] = {"main": pickled}
    with pytest.raises(OSError, match=r"Hub repo 'org/pickled' has no safetensors weights \(model\.safetensors or "
                                      r"model\.safetensors\.index\.json\); it has pickle weights "
                                      r"\['pytorch_model\.bin'\], which peft-alps never downloads or unpickles"):
        localize_heads("org/base", "org/pickled")
    assert not marker.exists()
    assert not [r for r in hub.log if r.path.endswith(".bin")]


def test_an_unknown_repo_is_named(hub):
    with pytest.raises(OSError, match=r"'org/nope' is not a local folder, and the Hugging Face Hub has no such repo "
                                      r"or revision \('org/nope'; RepositoryNotFoundError"):
        localize_heads("org/base", "org/nope")


def test_cli_prints_the_bytes_read_against_the_checkpoint_size(pair, tmp_path):
    """The CLI in a fresh process, with HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE=0 from the environment."""
    base, task, local = pair
    with HubServer({"org/base": {"main": base}, "org/task": {"main": task}}) as server:
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0",
               "HF_TOKEN": "hf_test_token",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        env.pop("HF_HUB_CACHE", None)
        out = tmp_path / "heads.json"
        run = subprocess.run([sys.executable, "-m", "peft_alps.cli", "localize", "--base", "org/base", "--task",
                              "org/task", "--output", str(out), "--no-progress"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    total = _sizes(base)["total"] + _sizes(task)["total"]
    read = server.sent(lambda r: r.path.endswith(".safetensors"))
    assert f"read {read / 1e6:,.1f} MB from the Hub of {total / 1e6:,.1f} MB of checkpoints" in run.stdout
    assert "org/base: " in run.stdout and "4 layers read, 0 from the cache" in run.stdout
    assert json.loads(out.read_text())["scores"] == local.scores.tolist()
    assert (tmp_path / "home" / "peft-alps" / "attention" / "models--org--base").is_dir()
    assert {r.authorization for r in server.log if r.path.startswith(("/api/models", "/org/"))} == {"Bearer hf_test_token"}
