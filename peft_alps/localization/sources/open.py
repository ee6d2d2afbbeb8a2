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
  the shards that hold attention tensors are read whole from the Hugging Face cache (:func:`_hub_source`);
* an in-memory **transformers model** is read module by module; a bitsandbytes 4/8-bit weight is
  dequantized one layer at a time (the last few layers are kept while their rows are asked for).

Heads are located only through the head-layout registry (:mod:`peft_alps.layouts`), so every registered
family works, including fused (``qkv``) and transposed (GPT-2 ``Conv1D``) storage.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from peft_alps.layouts import HeadDims, HeadLayout, Projection, layout_for_config

SCORED_ROLES = ("q", "k", "v", "qkv", "qkv_grouped")  # the projections a head's score is built from
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

LayerTensors = dict[Projection, torch.Tensor]  # stored weight of each scored projection of one layer
LAYER_CACHE = 3  # layers kept by AttentionSource.rows (threads score neighbouring layers at the same time)
# safetensors dtypes whose bytes are read straight into a torch tensor (others go through safe_open)
# A fault on a mapped file page maps its whole page-cache folio (Linux: up to 2 MiB, one PMD), so pages are released
# in aligned windows of that size; pages of neighbouring rows that another thread still uses are read back.
_FAULT_AROUND = max(mmap.PAGESIZE, 1 << 21)
_RAW_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class AttentionSource:
    """The scored attention weights of one model, served a layer at a time.

    Attributes:
        name: identifier recorded in the head scores (folder path, repo id or model name).
        config: the transformers config.
        layout, dims: the head layout and geometry from the registry.
    """

    name: str
    config: Any
    layout: HeadLayout
    dims: HeadDims

    def _init_layout(self, config: Any) -> None:
        self.config = config
        self.layout, self.dims = layout_for_config(config)
        self.projections = tuple(p for p in self.layout.projections if p.role in SCORED_ROLES)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, LayerTensors] = OrderedDict()

    def layer(self, index: int) -> LayerTensors:
        """Stored weights (storage orientation; ``Projection.transposed`` says how) of one layer's scored
        projections, checked to be finite."""
        raise NotImplementedError

    def rows(self, layer: int, proj: Projection, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of one scored projection's weight in ``[out, in]`` orientation, in the stored dtype,
        checked to be finite. Safe to call from several threads.

        This default slices :meth:`layer`, keeping the last few layers read (shared by the threads that score
        their heads)."""
        return _pick_rows(self._oriented(layer, proj), rows)

    def shape(self, layer: int, proj: Projection) -> tuple[int, ...]:
        """Shape of one scored projection's weight in ``[out, in]`` orientation."""
        return tuple(self._oriented(layer, proj).shape)

    def _oriented(self, layer: int, proj: Projection) -> torch.Tensor:
        with self._lock:
            tensors = self._cache.get(layer)
            if tensors is None:
                tensors = self._cache[layer] = self.layer(layer)
                while len(self._cache) > LAYER_CACHE:
                    self._cache.popitem(last=False)
        stored = tensors[proj]
        return stored.t() if proj.transposed and stored.dim() == 2 else stored

    def release(self) -> None:
        """Let go of the memory behind the views this thread got from :meth:`rows` (no-op here)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_safetensors(path: str | os.PathLike):
    """``safe_open`` that names a damaged file (truncated download, corrupted header) and says what to do."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise OSError(
            f"checkpoint file {str(path)!r} is truncated or corrupted ({size} bytes; safetensors says: {err}). "
            "Delete it and download or save the checkpoint again."
        ) from err


def _claim(slots: dict, slot: tuple[int, Projection], name: str, value: Any, source: AttentionSource) -> None:
    """Refuse a second tensor/module for the same (layer, projection): e.g. a multimodal model whose vision tower
    also has ``layers.N.self_attn.q_proj`` (added by the architectures helper; silently overwriting mixed them)."""
    if slot in slots and slots[slot][0] != name:
        raise ValueError(
            f"{source.name!r}: {slots[slot][0]!r} and {name!r} both match layer {slot[0]}'s {slot[1].path} of the "
            f"{source.config.model_type} head layout (a vision tower next to the language model?). Localize the "
            "language model alone: pass its sub-model (e.g. model.language_model) or a checkpoint of it."
        )


def _sum_is_finite(tensor: torch.Tensor) -> bool:
    """A cheap necessary test for finite weights: a plain sum is NaN/inf if any entry is, and otherwise only if it
    overflows (the caller then counts exactly). ~40x cheaper than ``isfinite()``. (A float16 sum is taken in
    float32: 65504 is within reach.)"""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()
    return math.isfinite(float(total))


def _check_finite(tensor: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """Refuse NaN/inf weights, naming the tensor and counting them (see :func:`_sum_is_finite`)."""
    if not tensor.is_floating_point():
        return tensor
    if not _sum_is_finite(tensor) and (bad := int((~torch.isfinite(tensor)).sum())):
        raise ValueError(
            f"tensor {name!r} of {where} has {bad} NaN/inf value(s); head scores need finite weights. "
            "Check the checkpoint (a diverged fine-tune or a broken conversion)."
        )
    return tensor


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs of a row list, in order."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _pick_rows(weight: torch.Tensor, rows: list[int]) -> torch.Tensor:
    runs = _runs(rows)
    if len(runs) == 1:  # a view, no copy
        return weight[runs[0][0] : runs[0][1]]
    return weight.index_select(0, torch.tensor(rows, dtype=torch.long))


class _TouchedRanges(threading.local):
    """Per thread: the (memory map, offset, length) byte ranges its row views touched since its last release."""

    def __init__(self):
        self.ranges: list[tuple[mmap.mmap, int, int]] = []


class SafetensorsSource(AttentionSource):
    """Attention tensors of a checkpoint folder (``config.json`` + safetensors files).

    ``files`` maps each tensor name to the safetensors file that holds it; by default it is read from
    ``model.safetensors.index.json`` or from the headers of the folder's ``*.safetensors`` files.
    """

    def __init__(self, folder: str | os.PathLike, name: str | None = None, files: dict[str, Path] | None = None,
                 config: Any = None):
        folder = Path(folder)
        self.name = name or str(folder)
        self._init_layout(config if config is not None else _load_config(folder, self.name))
        self._index = self._locate(files if files is not None else _tensor_files(folder, self.name))
        self._spans: dict[Path, tuple[int, dict[str, Any], mmap.mmap]] = {}  # file -> (data start, header, map)
        self._touched = _TouchedRanges()

    def close(self) -> None:
        maps, self._spans = [entry[2] for entry in self._spans.values()], {}
        for mapping in maps:
            try:
                mapping.close()
            except BufferError:  # a tensor still views it: the map goes when that tensor does
                pass

    def _span(self, path: Path, tensor_name: str) -> tuple[int, dict[str, Any], mmap.mmap]:
        """Byte offset of the data section, the header entry of one tensor and the file's memory map (the file is
        validated by ``safe_open`` first, so a damaged file gets the usual error)."""
        with self._lock:
            if path not in self._spans:
                with _open_safetensors(path):
                    pass
                with open(path, "rb") as fh:  # safetensors layout: u64 header length, JSON header, data
                    length = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(length))
                    # private and never written: the pages are the page cache's, and release() can drop them
                    self._spans[path] = (8 + length, header, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY))
        start, header, mapping = self._spans[path]
        return start, header[tensor_name], mapping

    def rows(self, layer: int, proj: Projection, rows: list[int]) -> torch.Tensor:
        """Views the rows in the file's memory map (no copy; only their pages are read). The pages stay counted
        in the process's memory until :meth:`release`. Transposed or unusual storage goes through the default
        (whole tensors via ``safe_open``)."""
        tensor_name, path = self._index[(layer, proj)]
        start, entry, mapping = self._span(path, tensor_name)
        dtype, shape = _RAW_DTYPES.get(entry["dtype"]), entry["shape"]
        if proj.transposed or dtype is None or len(shape) != 2:
            return super().rows(layer, proj, rows)
        row_bytes = shape[1] * dtype.itemsize
        first_byte = start + entry["data_offsets"][0]
        pieces = []
        for first, stop in _runs(rows):
            if stop > shape[0]:
                raise IndexError(f"row {stop - 1} of {tensor_name!r} in {self.name!r}: the tensor has {shape[0]} rows")
            offset = first_byte + first * row_bytes
            pieces.append(torch.frombuffer(mapping, dtype=dtype, count=(stop - first) * shape[1], offset=offset))
            self._touched.ranges.append((mapping, offset, (stop - first) * row_bytes))
        out = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(len(rows), shape[1])
        if not _sum_is_finite(out):  # name the tensor and count its bad values over all of it
            with _open_safetensors(path) as f:
                _check_finite(f.get_tensor(tensor_name), tensor_name, repr(self.name))
        return out

    def release(self) -> None:
        """Drop the pages that this thread's :meth:`rows` views touched from the process's resident memory (they
        stay in the page cache; a view that is used again reads them back). Call when those views are done."""
        ranges, self._touched.ranges = self._touched.ranges, []
        for mapping, offset, length in ranges:
            start = offset - offset % _FAULT_AROUND
            stop = min(len(mapping), -(-(offset + length) // _FAULT_AROUND) * _FAULT_AROUND)
            mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def shape(self, layer: int, proj: Projection) -> tuple[int, ...]:
        tensor_name, path = self._index[(layer, proj)]
        shape = tuple(self._span(path, tensor_name)[1]["shape"])
        return shape[::-1] if proj.transposed and len(shape) == 2 else shape

    def _locate(self, files: dict[str, Path]) -> dict[tuple[int, Projection], tuple[str, Path]]:
        index: dict[tuple[int, Projection], tuple[str, Path]] = {}
        prefix = None
        for tensor_name, path in files.items():
            found = self.layout.match_tensor(tensor_name)
            if found is None or found[2] != "weight" or found[1].role not in SCORED_ROLES:
                continue
            layer, proj, _ = found
            if layer < self.dims.num_layers:
                _claim(index, (layer, proj), tensor_name, (tensor_name, path), self)
                index[(layer, proj)] = (tensor_name, path)
                prefix = prefix or tensor_name[: tensor_name.index(f"{self.layout.layers}.{layer}.")]
        missing = [
            f"{prefix or ''}{self.layout.layers}.{layer}.{proj.path}.weight"
            for layer in range(self.dims.num_layers)
            for proj in self.projections
            if (layer, proj) not in index
        ]
        if missing:
            some = sorted(files)[:5]
            raise ValueError(
                f"checkpoint {self.name!r} lacks the attention tensors that localization needs: "
                f"missing {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                + f" (a {self.config.model_type} model with {self.dims.num_layers} layers needs "
                f"{', '.join(p.path for p in self.projections)} in every layer; the checkpoint has "
                f"{len(files)} tensors, e.g. {some}). Save the full model or all attention weights."
            )
        return index

    def layer(self, index: int) -> LayerTensors:
        # Open the files for this layer only: a long-lived safe_open keeps every page it touched mapped (and
        # counted in RSS), so the resident size would grow with the model instead of staying one layer.
        by_file: dict[Path, list[tuple[Projection, str]]] = {}
        for proj in self.projections:
            tensor_name, path = self._index[(index, proj)]
            by_file.setdefault(path, []).append((proj, tensor_name))
        out = {}
        for path, wanted in by_file.items():
            with _open_safetensors(path) as f:
                for proj, tensor_name in wanted:
                    out[proj] = _check_finite(f.get_tensor(tensor_name), tensor_name, repr(self.name))
        return out


def _load_config(folder: Path, name: str) -> Any:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise OSError(f"{name!r} is not a checkpoint folder: it has no config.json (looked in {folder}). Pass a folder "
                      "written by save_pretrained (config.json + safetensors) or a Hub repo id")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError) as err:  # e.g. "Unrecognized model in ...": no or an unknown model_type
        raise OSError(f"{name!r} is not a checkpoint folder transformers can read: its config.json does not load "
                      f"({str(err).splitlines()[0]})") from None


def _tensor_files(folder: Path, name: str) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index when present, else from the file headers."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_index(index_path, name)
        return {tensor: folder / file for tensor, file in weight_map.items()}
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise OSError(
            f"checkpoint {name!r} has no *.safetensors files" + (f" (found {others})" if others else "")
            + "; localization streams safetensors. Re-save it with model.save_pretrained(folder) "
            "(safetensors is the default) or pass the loaded model itself."
        )
    files: dict[str, Path] = {}
    for path in paths:
        with _open_safetensors(path) as f:
            files.update({tensor: path for tensor in f.keys()})
    return files


def _read_index(path: Path, name: str) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"shard index {str(path)!r} of checkpoint {name!r} is malformed ({err}); expected "
                         "{'weight_map': {tensor: file}}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"shard index {str(path)!r} of checkpoint {name!r}: 'weight_map' must be an object")
    return weight_map


# ------------------------------------------------------------------------------------------------ the Hub

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _fetch_hub_config(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
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


def _hub_source(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                local_files_only: bool = False) -> SafetensorsSource:
    """Fetch config, shard index and only the shards holding attention tensors whole; read them like a folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))

    config_path = _fetch_hub_config(repo_id, revision, cache_dir, local_files_only)
    config = _load_config(config_path.parent, repo_id)
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        weight_map = _read_index(fetch(INDEX_FILE), name)
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
        with _open_safetensors(path) as f:
            return SafetensorsSource(path.parent, name=name, files={t: path for t in f.keys()}, config=config)
    layout, dims = layout_for_config(config)
    needed = sorted({
        file for tensor, file in weight_map.items()
        if (m := layout.match_tensor(tensor)) and m[2] == "weight" and m[1].role in SCORED_ROLES
    })
    local = {file: fetch(file) for file in needed}
    files = {tensor: local.get(file, config_path.parent / file) for tensor, file in weight_map.items()}
    return SafetensorsSource(config_path.parent, name=name, files=files, config=config)


# ------------------------------------------------------------------------------------------ in-memory models


class ModuleSource(AttentionSource):
    """Attention weights of a loaded transformers model, read (and dequantized if 4/8-bit) a layer at a time.

    A PEFT model (or a model with adapters injected) is read as its forward pass computes, i.e. with its active
    adapters' deltas added, one projection at a time and without changing the model; ``frozen=True`` reads it
    without adapters. See :mod:`peft_alps.localization.sources.adapted_weights`."""

    def __init__(self, model: torch.nn.Module, name: str | None = None, frozen: bool = False):
        from peft_alps.localization.sources.adapted_weights import check_localizable

        check_localizable(model)
        self.frozen = frozen
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "model_type"):
            raise ValueError(
                f"cannot localize heads of a {type(model).__name__}: pass a transformers model (with a "
                "config.model_type), a checkpoint folder or a Hub repo id"
            )
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        self._init_layout(config)
        self._modules: dict[tuple[int, Projection], tuple[str, torch.nn.Module]] = {}
        for module_name, module in model.named_modules():
            found = self.layout.match(module_name)
            if found and found[1].role in SCORED_ROLES and found[0] < self.dims.num_layers:
                _claim(self._modules, found, module_name, (module_name, module), self)
                self._modules[found] = (module_name, module)
        missing = [
            f"{self.layout.layers}.{layer}.{proj.path}"
            for layer in range(self.dims.num_layers) for proj in self.projections
            if (layer, proj) not in self._modules
        ]
        if missing:
            raise ValueError(
                f"model {self.name!r} lacks the attention modules that localization needs: missing {missing[0]!r}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )

    def layer(self, index: int) -> LayerTensors:
        from peft_alps.localization.sources.adapted_weights import projection_weight

        out = {}
        for proj in self.projections:
            module_name, module = self._modules[(index, proj)]
            with torch.no_grad():
                weight = projection_weight(module, module_name, _stored_weight, frozen=self.frozen).to("cpu")
            out[proj] = _check_finite(weight, f"{module_name}.weight", f"model {self.name!r}")
        return out


def _stored_weight(module: torch.nn.Module) -> torch.Tensor:
    """A plain layer's weight; bitsandbytes 4/8-bit etc.: this one layer, dequantized (a CPU 4-bit weight that
    bitsandbytes repacked for inference is restored first, inside dequantized_weight)."""
    from peft_alps.tuner.quantization import dequantized_weight, is_quantized_linear

    if is_quantized_linear(module):
        return dequantized_weight(module, dtype=None)
    return module.weight.detach()


# ------------------------------------------------------------------------------------------------ dispatch


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
    from peft_alps.localization.sources.hub import hub_source

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
        folder = _fetch_hub_config(name, revision, cache_dir).parent
    return _load_config(folder, name)
