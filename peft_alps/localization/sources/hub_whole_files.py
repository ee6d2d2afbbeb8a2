"""A Hub repo read the simple way: its config, shard index and the shards that hold attention tensors are fetched
whole into the Hugging Face cache, then read like a folder. :mod:`.hub` uses this offline, or when a server has no
HTTP Range support; otherwise it reads only the q/k/v byte ranges."""

from __future__ import annotations

from pathlib import Path

from peft_alps.layouts import layout_for_config
from peft_alps.localization.sources.base import INDEX_FILE, SCORED_ROLES, SINGLE_FILE
from peft_alps.localization.sources.folder import SafetensorsSource, load_config, open_safetensors, read_index


def fetch_hub_config(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                      local_files_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one clear OSError
        raise OSError(
            f"{repo_id!r} is not a local folder, and its config.json could not be fetched from the Hugging Face "
            f"Hub or found in the local cache ({type(err).__name__}: {err}). Pass an existing checkpoint folder, "
            "a loaded model, or a repo id that is cached (HF_HUB_OFFLINE=1) or reachable."
        ) from err


def whole_files_source(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                local_files_only: bool = False) -> SafetensorsSource:
    """Fetch config, shard index and only the shards holding attention tensors whole; read them like a folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))

    config_path = fetch_hub_config(repo_id, revision, cache_dir, local_files_only)
    config = load_config(config_path.parent, repo_id)
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        weight_map = read_index(fetch(INDEX_FILE), name)
    except EntryNotFoundError:  # not sharded (or, offline, the index is not cached): try the single file
        weight_map = None
    except OSError as err:
        raise OSError(f"could not fetch {INDEX_FILE} of repo {repo_id!r}: {type(err).__name__}: {err}") from err
    if weight_map is None:
        try:
            path = fetch(SINGLE_FILE)
        except Exception as err:  # noqa: BLE001
            raise OSError(
                f"repo {repo_id!r} has neither {INDEX_FILE} nor {SINGLE_FILE} (locally cached or on the Hub): "
                f"{type(err).__name__}: {err}. Localization reads safetensors checkpoints."
            ) from err
        with open_safetensors(path) as f:
            return SafetensorsSource(path.parent, name=name, files={t: path for t in f.keys()}, config=config)
    layout, dims = layout_for_config(config)
    needed = sorted({
        file for tensor, file in weight_map.items()
        if (m := layout.match_tensor(tensor)) and m[2] == "weight" and m[1].role in SCORED_ROLES
    })
    local = {file: fetch(file) for file in needed}
    files = {tensor: local.get(file, config_path.parent / file) for tensor, file in weight_map.items()}
    return SafetensorsSource(config_path.parent, name=name, files=files, config=config)
