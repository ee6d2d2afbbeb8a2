"""Localize Hub checkpoints by reading only their q/k/v bytes: the policy that turns a repo id into a source.

A safetensors file starts with a JSON header that gives every tensor's byte offsets, so the q/k/v tensors of a
Hub checkpoint can be read without the rest (the MLPs and embeddings, ~90% of a Llama-style model's bytes).
:func:`hub_source` decides where they come from:

1. the revision is resolved to its commit (``HfApi.model_info``; skipped when it is a commit sha whose attention
   is cached), and ``refs/{revision}`` of the attention cache records it;
2. a complete per-commit attention cache (:mod:`peft_alps.localization.sources.hub_cache`) is used as it is, and a second run
   of a cached repo reads nothing from the network (not even the revision, when it is a commit sha);
3. else ``config.json`` and the shard index come through ``hf_hub_download``, each shard's header is read with two
   small Range requests (:mod:`peft_alps.localization.sources.hub_ranges`), and together they form the cache's manifest; the missing
   layers are read in the background as the scoring asks for them (:mod:`peft_alps.localization.sources.hub_read_ahead`), so a run that
   broke off resumes at the first missing layer.

With ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached: a complete attention cache, else the shards in the
Hugging Face cache, else a clear error that says what is cached. A server that answers a Range request with the
whole file (200) makes this fall back, with one warning per endpoint, to downloading whole shards. Repos with only
pickle weights (``*.bin``) are refused; nothing is unpickled. What each source cost is its ``transfer``
(:mod:`peft_alps.localization.sources.hub_transfer`).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from peft_alps.localization.sources.hub_cache import (MANIFEST, attention_cache_root, build_manifest, by_layer, manifest_entries,
                              missing_layers, read_manifest, write_atomic)
from peft_alps.localization.sources.base import INDEX_FILE, SINGLE_FILE
from peft_alps.localization.sources.folder import load_config, read_index
from peft_alps.localization.sources.hub_whole_files import whole_files_source
from peft_alps.localization.sources.hub_transfer import Transfer, format_bytes
from peft_alps.localization.sources.hub_ranges import RangeNotSupported, RangeReader
from peft_alps.localization.sources.hub_read_ahead import open_cache, open_complete_cache

_SHA = re.compile(r"^[0-9a-f]{40}$")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_warned_endpoints: set[str] = set()


def hub_source(repo_id: str, revision: str | None = None, cache_dir: str | None = None):
    """An attention source for a Hub repo id that reads only its q/k/v bytes (see the module docstring)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    name = repo_id if revision is None else f"{repo_id}@{revision}"
    root = attention_cache_root(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    if constants.is_offline_mode():
        return _offline_source(repo_id, revision, cache_dir, root, name)
    if revision is not None and _SHA.match(revision) and (cached := open_complete_cache(root / revision, name)):
        return cached
    commit, files = _resolve(repo_id, revision, name)
    if commit is None:  # the Hub could not be reached: whatever the caches hold
        return _offline_source(repo_id, revision, cache_dir, root, name, reason=files)
    write_atomic(root / "refs" / (revision or "main"), commit.encode())
    if cached := open_complete_cache(root / commit, name):
        return cached
    transfer = Transfer(repo=name, cache_dir=root / commit)
    reader = RangeReader(repo_id, commit, cache_dir, transfer)
    try:
        manifest = read_manifest(root / commit) or _new_manifest(reader, files, root / commit, name)
    except RangeNotSupported as err:
        return _whole_files(repo_id, commit, cache_dir, name, err)
    return open_cache(root / commit, name, manifest, reader, transfer)


def _resolve(repo_id: str, revision: str | None, name: str):
    """``(commit, {file: size})`` of the revision from the Hub, or ``(None, reason)`` when it cannot be reached."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from peft_alps._version import __version__

    try:
        info = HfApi(library_name="peft-alps", library_version=__version__).model_info(
            repo_id, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:
        raise OSError(
            f"{repo_id!r} is not a local folder, and the Hugging Face Hub has no such repo or revision ({name!r}; "
            f"{type(err).__name__}: {str(err).splitlines()[0]}). Check the name and revision, or log in "
            "(`hf auth login` / HF_TOKEN) for a private or gated repo."
        ) from err
    except (httpx2.HTTPError, OSError) as err:
        return None, f"{type(err).__name__}: {err}"
    return info.sha, {s.rfilename: s.size for s in info.siblings or []}


def _new_manifest(reader: RangeReader, filenames: dict[str, int | None], folder: Path, name: str) -> dict[str, Any]:
    """Start the attention cache of a commit: its ``config.json`` and manifest (pickle-only repos are refused)."""
    from huggingface_hub import hf_hub_download


    if INDEX_FILE not in filenames and SINGLE_FILE not in filenames:
        pickles = sorted(f for f in filenames if f.endswith(_PICKLES))
        raise OSError(
            f"Hub repo {name!r} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})"
            + (f"; it has pickle weights {pickles}, which peft-alps never downloads or unpickles (a pickle can run "
               "code)" if pickles else f"; its files: {sorted(filenames)[:10]}")
            + ". Use a safetensors revision of the repo, or convert a trusted copy locally with "
            "model.save_pretrained(folder) and pass that folder."
        )
    fetch = lambda filename: hf_hub_download(reader.repo_id, filename, revision=reader.commit,  # noqa: E731
                                             cache_dir=reader.cache_dir)
    config_path = fetch("config.json")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "config.json", Path(config_path).read_bytes())
    config = load_config(folder, name)
    weight_map = read_index(Path(fetch(INDEX_FILE)), name) if INDEX_FILE in filenames else None
    manifest = build_manifest(reader, config, weight_map, filenames)
    write_atomic(folder / MANIFEST, json.dumps(manifest).encode())
    return manifest


def _offline_source(repo_id: str, revision: str | None, cache_dir, root: Path, name: str, reason: str | None = None):
    """Without the network: a complete attention cache, else the shards in the Hugging Face cache, else an error
    that says what is cached and how to get the rest."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    commit = revision if revision is not None and _SHA.match(revision) else None
    hf_repo = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    for refs in (root / "refs", hf_repo / "refs"):
        if commit is None and (refs / (revision or "main")).is_file():
            commit = (refs / (revision or "main")).read_text().strip()
    if commit is not None and (cached := open_complete_cache(root / commit, name)):
        return cached
    try:
        source = whole_files_source(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear OSError
        partly = _partly_cached(root / commit) if commit else ""
        why = ("HF_HUB_OFFLINE=1 is set" if reason is None else f"the Hub could not be reached ({reason})")
        raise OSError(
            f"{repo_id!r} is not a local folder, and Hub repo {name!r} is not in the local cache{partly}; {why}, so "
            "nothing can be downloaded. Unset HF_HUB_OFFLINE (or reconnect) to read its q/k/v bytes, or pass a "
            f"local checkpoint folder. (Nor does the Hugging Face cache {hf_repo} hold its config and the shards "
            "with its attention tensors.)"
        ) from err
    source.transfer = Transfer(repo=name, mode="cached")
    return source


def _partly_cached(folder: Path) -> str:
    """`` (n of N layers ... are in folder: the rest needs X MB)`` for an incomplete attention cache, else ''."""
    manifest = read_manifest(folder)
    if manifest is None:
        return ""
    entries = manifest_entries(manifest)
    missing = set(missing_layers(folder, entries))
    total = len(by_layer(entries))
    return (f" ({total - len(missing)} of {total} layers of its q/k/v tensors are in {folder}: the rest needs "
            f"{format_bytes(sum(e.size for e in entries if e.layer in missing))})")


def _whole_files(repo_id: str, commit: str, cache_dir, name: str, err: RangeNotSupported):
    """The fallback for a server without Range support: ``hf_hub_download`` the shards holding q/k/v tensors."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if constants.ENDPOINT not in _warned_endpoints:
        _warned_endpoints.add(constants.ENDPOINT)
        warnings.warn(
            f"the Hub server {constants.ENDPOINT} does not support HTTP Range requests ({err}); peft-alps falls back "
            "to downloading every safetensors shard that holds q/k/v tensors whole (into the Hugging Face cache).",
            stacklevel=5,
        )
    blobs = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    before = set(blobs.iterdir()) if blobs.is_dir() else set()
    source = whole_files_source(repo_id, revision=commit, cache_dir=cache_dir)
    source.name = name
    downloaded = sum(p.stat().st_size for p in set(blobs.iterdir()) - before) if blobs.is_dir() else 0
    source.transfer = Transfer(repo=name, mode="whole files", bytes_read=downloaded)
    return source
