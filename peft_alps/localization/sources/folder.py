"""A checkpoint folder as an attention source (``config.json`` + ``*.safetensors``, sharded or not).

The files are checked with ``safetensors.safe_open``, and rows are zero-copy views of the file's memory map, whose
pages are dropped from the process's memory by :meth:`SafetensorsSource.release` (nothing else in the file is read).
A folder that holds only the attention tensors is fine.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from peft_alps.layouts import Projection
from peft_alps.localization.sources.base import (INDEX_FILE, SCORED_ROLES, AttentionSource, LayerTensors, check_finite,
                                                 claim_slot, row_runs, sum_is_finite)

# safetensors dtypes whose bytes are read straight into a torch tensor (others go through safe_open)
# A fault on a mapped file page maps its whole page-cache folio (Linux: up to 2 MiB, one PMD), so pages are released
# in aligned windows of that size; pages of neighbouring rows that another thread still uses are read back.
_FAULT_AROUND = max(mmap.PAGESIZE, 1 << 21)
_RAW_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def open_safetensors(path: str | os.PathLike):
    """``safe_open`` that names a damaged file (truncated download, corrupted header) and says what to do."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise OSError(
            f"checkpoint file {str(path)!r} is truncated or corrupted ({size} bytes; safetensors says: {err}). "
            "Delete it and download or save the checkpoint again."
        ) from err




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
        self._init_layout(config if config is not None else load_config(folder, self.name))
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
                with open_safetensors(path):
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
        for first, stop in row_runs(rows):
            if stop > shape[0]:
                raise IndexError(f"row {stop - 1} of {tensor_name!r} in {self.name!r}: the tensor has {shape[0]} rows")
            offset = first_byte + first * row_bytes
            pieces.append(torch.frombuffer(mapping, dtype=dtype, count=(stop - first) * shape[1], offset=offset))
            self._touched.ranges.append((mapping, offset, (stop - first) * row_bytes))
        out = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(len(rows), shape[1])
        if not sum_is_finite(out):  # name the tensor and count its bad values over all of it
            with open_safetensors(path) as f:
                check_finite(f.get_tensor(tensor_name), tensor_name, repr(self.name))
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
                claim_slot(index, (layer, proj), tensor_name, (tensor_name, path), self)
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
            with open_safetensors(path) as f:
                for proj, tensor_name in wanted:
                    out[proj] = check_finite(f.get_tensor(tensor_name), tensor_name, repr(self.name))
        return out


def load_config(folder: Path, name: str) -> Any:
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
        weight_map = read_index(index_path, name)
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
        with open_safetensors(path) as f:
            files.update({tensor: path for tensor in f.keys()})
    return files


def read_index(path: Path, name: str) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"shard index {str(path)!r} of checkpoint {name!r} is malformed ({err}); expected "
                         "{'weight_map': {tensor: file}}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"shard index {str(path)!r} of checkpoint {name!r}: 'weight_map' must be an object")
    return weight_map
