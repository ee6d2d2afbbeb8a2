"""Hub round trip without network (issue 8).

* Loading by repo id goes through huggingface_hub's real cache layout (``models--org--name/blobs``,
  ``snapshots/<sha>/`` symlinks, ``refs/<branch>``) with ``HF_HUB_OFFLINE=1``.
* ``push_to_hub`` is captured at the huggingface_hub API boundary (``HfApi.create_repo`` /
  ``HfApi.create_commit``): which files, which sizes, which model card.
* Model cards (``save_pretrained`` and ``push_to_hub``) carry ``library_name: peft``, the ``alps`` tag, the
  base model and the selected heads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load, load_file

import peft_alps
from peft_alps import AlpsConfig
from peft_alps.integrations import model_card as alps_card
from tests.support.tiny_models import batch, tiny_llama

HEADS = {0: [1, 5], 2: [0]}


# ----------------------------------------------------------------------------- a real HF cache, built by hand


def cache_repo(cache: Path, repo_id: str, folder: Path, *, revision: str = "main", subfolder: str = "") -> str:
    """Put the files of ``folder`` into ``cache`` the way ``hf_hub_download`` stores them, under ``revision``.

    Layout (huggingface_hub ``file_download``): ``models--{org}--{name}/blobs/{etag}`` holds the content,
    ``snapshots/{commit}/{path}`` is a relative symlink to the blob, ``refs/{revision}`` holds the commit hash.
    Returns the commit hash.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1((repo_id + revision + "".join(p.name for p in files)).encode()).hexdigest()
    for path in files:
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest()  # LFS files use the sha256; any unique name works for the cache
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        rel = Path(subfolder) / path.relative_to(folder) if subfolder else path.relative_to(folder)
        pointer = repo / "snapshots" / commit / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests/conftest.py must set HF_HUB_OFFLINE=1"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def trained(tmp_path):
    """A base model saved as a checkpoint, and an ALPS adapter with non-zero deltas saved next to it."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, AlpsConfig(target_heads=HEADS, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(batch()).logits
    return tmp_path / "base", tmp_path / "adapter", expected


def _logits(model):
    with torch.no_grad():
        return model(batch()).logits


def test_from_pretrained_by_repo_id_through_the_offline_cache(hub_cache, trained):
    _, adapter, expected = trained
    cache_repo(hub_cache, "org/alps-adapter", adapter)
    model = PeftModel.from_pretrained(tiny_llama(), "org/alps-adapter")
    assert torch.equal(_logits(model), expected)


def test_auto_peft_model_resolves_base_and_adapter_from_the_cache(hub_cache, trained):
    base, adapter, expected = trained
    cache_repo(hub_cache, "org/tiny-base", base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    cache_repo(hub_cache, "org/alps-adapter", adapter)
    model = AutoPeftModelForCausalLM.from_pretrained("org/alps-adapter")
    assert torch.equal(_logits(model.eval()), expected)


def test_revision_is_honoured(hub_cache, trained, tmp_path):
    # (Not `subfolder=`: PEFT 0.21's offline branch of load_peft_weights joins the subfolder twice,
    # "run1/run1/adapter_model.safetensors", for any adapter type.)
    _, adapter, expected = trained
    other = get_peft_model(tiny_llama(), AlpsConfig(target_heads={1: [2]}, init_weights=False))
    other.save_pretrained(tmp_path / "other")
    cache_repo(hub_cache, "org/runs", tmp_path / "other", revision="main")
    cache_repo(hub_cache, "org/runs", adapter, revision="v2")
    model = PeftModel.from_pretrained(tiny_llama(), "org/runs", revision="v2")
    assert torch.equal(_logits(model), expected)
    main = PeftModel.from_pretrained(tiny_llama(), "org/runs")
    assert main.peft_config["default"].target_heads == {1: [2]}


def test_damaged_file_in_the_cache_is_named_and_model_untouched(hub_cache, trained):
    _, adapter, _ = trained
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    cache_repo(hub_cache, "org/broken", adapter)
    base = tiny_llama()
    with pytest.raises(OSError, match=r"models--org--broken/snapshots/[0-9a-f]+/adapter_model\.safetensors is "
                                      r"truncated or corrupted.*download it again"):
        PeftModel.from_pretrained(base, "org/broken")
    assert not any(isinstance(m, peft_alps.AlpsLayer) for m in base.modules())


def test_repo_with_only_a_pickle_is_refused_without_opening_it(hub_cache, trained, tmp_path):
    import pickle

    from tests.test_safe_loading import _Planted

    _, adapter, _ = trained
    os.remove(adapter / "adapter_model.safetensors")
    marker = tmp_path / "code-ran"
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Planted(str(marker))}, f)
    cache_repo(hub_cache, "org/pickled", adapter)
    with pytest.raises(OSError, match=r"the cached copy of Hub repo 'org/pickled' has a pickle adapter_model\.bin "
                                      r"but no adapter_model\.safetensors.*never read"):
        PeftModel.from_pretrained(tiny_llama(), "org/pickled")
    assert not marker.exists()


def test_repo_whose_weights_are_not_cached_is_named(hub_cache, trained, tmp_path):
    _, adapter, _ = trained
    (tmp_path / "config-only").mkdir()
    shutil.copy(adapter / "adapter_config.json", tmp_path / "config-only")
    cache_repo(hub_cache, "org/half-cached", tmp_path / "config-only")
    base = tiny_llama()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors of Hub repo 'org/half-cached' is not "
                                                r"in the local Hugging Face cache.*HF_HUB_OFFLINE=1"):
        PeftModel.from_pretrained(base, "org/half-cached")
    assert not any(isinstance(m, peft_alps.AlpsLayer) for m in base.modules())


# ----------------------------------------------------------------------------- push_to_hub, captured


class CapturedHub:
    """Stands in for the Hub at ``HfApi.create_repo`` / ``HfApi.create_commit``: records what would be sent."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
            files[op.path_in_repo] = (op.upload_info.size, data)
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return "https://huggingface.co/commit/0"

    def card(self, index=-1) -> ModelCard:
        return ModelCard(self.commits[index]["files"]["README.md"][1].decode())


@pytest.fixture
def captured(monkeypatch, hub_cache):
    hub = CapturedHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: hub.create_commit(api, repo_id, operations, **kw))
    return hub


def named_base(name="org/tiny-base"):
    base = tiny_llama()
    base.name_or_path = name
    base.config._name_or_path = name
    return base


def assert_alps_card(card: ModelCard, base="org/tiny-base", heads=HEADS):
    assert card.data.library_name == "peft"
    assert "alps" in card.data.tags and "peft" in card.data.tags
    assert card.data.base_model == base
    assert f"base_model:adapter:{base}" in card.data.tags
    count = sum(len(h) for h in heads.values())
    assert f"**Selected heads:** {count} of 24" in card.text
    for layer, hs in heads.items():
        assert f"  - layer {layer}: {', '.join(map(str, hs))}" in card.text
    assert card.text.count(alps_card.START) == 1


def test_push_to_hub_commits_adapter_files_and_alps_card(captured, tmp_path):
    model = get_peft_model(named_base(), AlpsConfig(target_heads=HEADS, init_weights=False))
    model.save_pretrained(tmp_path / "local")
    model.push_to_hub("org/my-alps", commit_message="add adapter")

    assert [r[0] for r in captured.repos] == ["org/my-alps"]
    [commit] = captured.commits
    assert commit["repo_id"] == "org/my-alps" and commit["commit_message"] == "add adapter"
    files = commit["files"]
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name, (size, data) in files.items():
        assert size == len(data), name
    size, data = files["adapter_model.safetensors"]
    assert size == os.path.getsize(tmp_path / "local" / "adapter_model.safetensors")
    pushed = load(data)
    local = load_file(tmp_path / "local" / "adapter_model.safetensors")
    assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
    assert json.loads(files["adapter_config.json"][1])["target_heads"] == {"0": [1, 5], "2": [0]}
    assert_alps_card(captured.card())


def test_push_keeps_user_tags_and_the_existing_hub_card(captured, hub_cache, tmp_path):
    """A repo that already has a card on the Hub (here: in the offline cache) keeps its text and tags."""
    existing = tmp_path / "remote"
    existing.mkdir()
    (existing / "README.md").write_text("---\ntags:\n- keep-me\nlicense: mit\n---\n\n# My adapter\n\nHand-written notes.\n")
    cache_repo(hub_cache, "org/my-alps", existing)
    model = get_peft_model(named_base(), AlpsConfig(target_heads=HEADS))
    model.push_to_hub("org/my-alps", tags=["from-push"])
    card = captured.card()
    assert_alps_card(card)
    assert {"keep-me", "from-push"} <= set(card.data.tags)
    assert card.data.license == "mit"
    assert "Hand-written notes." in card.text


def test_without_the_hook_transformers_uploads_its_own_card(captured, monkeypatch):
    """The fact behind the hook: transformers' push_to_hub replaces README.md with a `transformers` card."""
    monkeypatch.setattr(PeftModel, "_upload_modified_files", PeftModel._upload_modified_files.__wrapped__)
    model = get_peft_model(named_base(), AlpsConfig(target_heads=HEADS))
    model.push_to_hub("org/my-alps")
    card = captured.card()
    assert card.data.library_name == "transformers"
    assert "alps" not in (card.data.tags or [])


# ----------------------------------------------------------------------------- save_pretrained cards


def test_save_pretrained_card(tmp_path):
    model = get_peft_model(named_base(), AlpsConfig(target_heads=HEADS))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again updates the card instead of stacking sections
    assert_alps_card(ModelCard.load(tmp_path / "README.md"))


def test_card_lists_every_alps_adapter(tmp_path):
    model = get_peft_model(named_base(), AlpsConfig(target_heads=HEADS))
    model.add_adapter("math", AlpsConfig(target_heads={1: [7]}, target_modules=["q_proj", "k_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert "### Adapter `default`" in text and "### Adapter `math`" in text
    assert "  - layer 1: 7" in text and "**Projections:** `k_proj`, `q_proj`, `v_proj`" in text


def test_unnamed_base_gives_no_empty_base_model(tmp_path):
    """A base built from a config has no name; PEFT alone writes `base_model: ''`, which the Hub rejects."""
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads=HEADS))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "alps" in card.data.tags
    assert not card.data.base_model and "base_model:adapter:" not in card.data.tags


def test_other_peft_methods_keep_peft_card(tmp_path):
    model = get_peft_model(named_base(), LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "alps" not in card.data.tags and alps_card.START not in card.text


def test_install_is_idempotent_and_detects_a_changed_peft():
    before = (PeftModel.create_or_update_model_card, PeftModel._upload_modified_files)
    alps_card.install()
    assert (PeftModel.create_or_update_model_card, PeftModel._upload_modified_files) == before
    assert alps_card.hook_problems(PeftModel) == {alps_card.SAVE_FEATURE: [], alps_card.PUSH_FEATURE: []}

    class ChangedPeftModel:
        def create_or_update_model_card(self, directory):  # renamed argument
            pass

    problems = alps_card.hook_problems(ChangedPeftModel)
    assert problems[alps_card.SAVE_FEATURE] == [
        "PeftModel.create_or_update_model_card(self, output_dir) is missing or changed"]
    assert any("_upload_modified_files" in p for p in problems[alps_card.PUSH_FEATURE])


# ----------------------------------------------------------------------------- localization from repo ids


def test_localize_heads_on_repo_ids_through_the_offline_cache(hub_cache, tmp_path):
    """Base and task given as Hub ids (the task at a non-default revision) give the same bytes as the folders."""
    from peft_alps import localize_heads

    base, task = tiny_llama(seed=0), tiny_llama(seed=5)
    base.save_pretrained(tmp_path / "base")
    task.save_pretrained(tmp_path / "task")
    cache_repo(hub_cache, "org/tiny-base", tmp_path / "base")
    cache_repo(hub_cache, "org/tiny-task", tmp_path / "base", revision="main")  # main: an untrained copy
    cache_repo(hub_cache, "org/tiny-task", tmp_path / "task", revision="sft")
    expected = localize_heads(tmp_path / "base", tmp_path / "task")
    scores = localize_heads("org/tiny-base", "org/tiny-task", task_revision="sft")
    assert scores.scores.tobytes() == expected.scores.tobytes()
    assert (scores.base, scores.task) == ("org/tiny-base", "org/tiny-task@sft")
    assert not localize_heads("org/tiny-base", "org/tiny-task").scores.any()  # main is the base itself
    with pytest.raises(OSError, match=r"'org/not-cached' is not a local folder.*local cache"):
        localize_heads("org/tiny-base", "org/not-cached")
