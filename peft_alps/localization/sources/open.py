"""Read a model's attention weights a few rows at a time: from a checkpoint folder, a Hub repo or a live model.

Localization compares two models weight by weight and needs only their q/k/v projections. An
:class:`AttentionSource` hands out the rows of one projection (:meth:`AttentionSource.rows`; localization asks for
one KV group of one layer at a time) or a whole layer (:meth:`AttentionSource.layer`):

* a **checkpoint folder** (``config.json`` + ``*.safetensors``, sharded or not): the files are checked with
  ``safetensors.safe_open``, and rows are zero-copy views of the file's memory map, whose pages are dropped from
  the process's memory by :meth:`AttentionSource.release` (nothing else in the file is read). A folder that holds
  only the attention tensors is fine;
* a **Hub repo id**: only the q/k/v byte ranges are read (HTTP Range, with read-ahead) into a per-commit attention
  cache, then read like a folder (:mod:`peft_alps.localization.sources.hub`); offline, or from a server without Range support,
  the shards that hold attention tensors are read whole from the Hugging Face cache (:func:`whole_files_source`);
* an in-memory **transformers model** is read module by module; a bitsandbytes 4/8-bit weight is
  dequantized one layer at a time (the last few layers are kept while their rows are asked for).

Heads are located only through the head-layout registry (:mod:`peft_alps.layouts`), so every registered
family works, including fused (``qkv``) and transposed (GPT-2 ``Conv1D``) storage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from peft_alps.localization.sources.base import AttentionSource
from peft_alps.localization.sources.folder import SafetensorsSource, load_config
from peft_alps.localization.sources.hub import hub_source
from peft_alps.localization.sources.hub_whole_files import fetch_hub_config
from peft_alps.localization.sources.module import ModuleSource

__all__ = ["AttentionSource", "ModuleSource", "SafetensorsSource", "local_folder", "open_source", "read_config"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def open_source(model_or_path: Any, *, revision: str | None = None, cache_dir: str | None = None,
                frozen: bool = False) -> AttentionSource:
    """An :class:`AttentionSource` for a checkpoint folder, a Hub repo id or an in-memory model (``frozen``: read
    an in-memory model without its adapters)."""
    if isinstance(model_or_path, AttentionSource):
        return model_or_path
    if isinstance(model_or_path, torch.nn.Module):
        return ModuleSource(model_or_path, frozen=frozen)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(
            f"expected a checkpoint folder, a Hub repo id or a transformers model, got {type(model_or_path).__name__}"
        )
    text = os.fspath(model_or_path)
    folder = local_folder(model_or_path)
    if folder is not None:
        return SafetensorsSource(folder, name=text)
    return hub_source(text, revision=revision, cache_dir=cache_dir)


def local_folder(path_or_repo: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``path_or_repo`` names, or ``None`` for a Hub repo id; anything else is an ``OSError``
    with the message every command gives for it (a file, or a path that neither exists nor is a repo id)."""
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise OSError(f"{text!r} is a file; pass the checkpoint folder that holds config.json and the safetensors files")
    if isinstance(path_or_repo, os.PathLike) or not _REPO_ID.match(text) or ".." in text:
        raise OSError(f"checkpoint folder {text!r} does not exist (and it is not a Hub repo id)")
    return None


def read_config(path_or_repo: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None) -> Any:
    """The transformers config of a checkpoint folder or Hub repo id, from its ``config.json`` alone (no weights
    are read), with the same error messages as :func:`open_source` for the same mistakes."""
    folder = local_folder(path_or_repo)
    name = os.fspath(path_or_repo)
    if folder is None:
        folder = fetch_hub_config(name, revision, cache_dir).parent
    return load_config(folder, name)
