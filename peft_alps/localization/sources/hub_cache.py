"""The per-commit attention cache: a Hub revision's q/k/v tensors, one small safetensors file per layer.

Layout, beside the Hugging Face Hub cache (:func:`attention_cache_root`)::

    peft-alps/attention/models--{org}--{name}/
        refs/{revision}              the commit of a branch or tag
        {commit}/config.json
        {commit}/manifest.json       every scored tensor: layer, shard, absolute byte range, dtype, shape
        {commit}/layer-00000.safetensors ...

The manifest (:func:`build_manifest`) comes from the shard index and the shards' headers. A layer file holds the
layer's tensors in request order (:func:`coalesce`), so its exact size and header follow from the manifest
(:func:`layer_header`); it is written as ``*.{pid}.partial`` and renamed into place when complete
(:func:`write_layer`), and it counts only when its size and header are exactly the predicted ones
(:func:`layer_file_is_complete`). So a broken-off run resumes at the first missing layer (:func:`missing_layers`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_alps.localization.sources.base import SCORED_ROLES, SINGLE_FILE
from peft_alps.layouts import layout_for_config
from peft_alps.localization.sources.hub_ranges import RangeReader, read_header

# Ranges of one shard are read as one request when the bytes between them are few: at most MAX_GAP, and at most
# 1/8 of the wanted bytes (so coalescing never reads more than 12.5% extra; a neighbouring o_proj is never read)
MAX_GAP = 1 << 20
HEADER_REQUEST_THREADS = 8
MANIFEST = "manifest.json"


def attention_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the attention caches live: ``peft-alps/attention`` beside the Hugging Face Hub cache."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser().parent / "peft-alps" / "attention"


# ------------------------------------------------------------------------------------------------ layer files


@dataclass(frozen=True)
class Entry:
    """One scored tensor: where its bytes are in its shard, and what it is."""

    name: str
    layer: int
    shard: str
    start: int
    stop: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start


def coalesce(entries: list[Entry]) -> list[tuple[str, int, int, list[Entry]]]:
    """``(shard, start, stop, entries)`` requests for some tensors: one per run of tensors of a shard whose gaps are
    small (see :data:`MAX_GAP`)."""
    out: list[tuple[str, int, int, list[Entry]]] = []
    for entry in sorted(entries, key=lambda e: (e.shard, e.start)):
        if out and out[-1][0] == entry.shard:
            shard, start, stop, members = out[-1]
            wanted = sum(m.size for m in members) + entry.size
            if 0 <= entry.start - stop <= min(MAX_GAP, wanted // 8):
                out[-1] = (shard, start, entry.stop, members + [entry])
                continue
        out.append((entry.shard, entry.start, entry.stop, [entry]))
    return out


def layer_file_name(layer: int) -> str:
    return f"layer-{layer:05d}.safetensors"


def layer_header(entries: list[Entry]) -> bytes:
    """The exact safetensors header (length prefix included) of a layer file: tensors in request order, the JSON
    padded with spaces to 8 bytes like safetensors does."""
    meta, offset = {}, 0
    for _, _, _, members in coalesce(entries):
        for e in members:
            meta[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.size]}
            offset += e.size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def layer_file_is_complete(path: Path, entries: list[Entry]) -> bool:
    """A layer file counts only with exactly the predicted size and header (never a half-written one)."""
    header = layer_header(entries)
    try:
        if path.stat().st_size != len(header) + sum(e.size for e in entries):
            return False
        with open(path, "rb") as fh:
            return fh.read(len(header)) == header
    except OSError:
        return False


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (one per process: concurrent runs don't mix)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    partial.write_bytes(data)
    os.replace(partial, path)


def write_layer(reader: RangeReader, path: Path, entries: list[Entry]) -> None:
    """Read one layer's tensors and write them as a safetensors file, renamed into place only when complete."""
    partial = partial_path(path)
    with open(partial, "wb") as out:
        out.write(layer_header(entries))
        for shard, start, stop, members in coalesce(entries):
            position = start
            with reader.open(shard, start, stop) as (chunks, _):
                for chunk in chunks:
                    end = position + len(chunk)
                    for e in members:  # the parts of the chunk that belong to a wanted tensor
                        lo, hi = max(e.start, position), min(e.stop, end)
                        if lo < hi:
                            out.write(chunk[lo - position : hi - position])
                    position = end
    if not layer_file_is_complete(partial, entries):
        raise OSError(f"{partial} does not have the size and header predicted from the manifest")
    os.replace(partial, path)


def by_layer(entries: list[Entry]) -> dict[int, list[Entry]]:
    out: dict[int, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.layer, []).append(e)
    return out


def missing_layers(folder: Path, entries: list[Entry]) -> list[int]:
    return [layer for layer, members in sorted(by_layer(entries).items())
            if not layer_file_is_complete(folder / layer_file_name(layer), members)]


# ------------------------------------------------------------------------------------------------ the manifest


def build_manifest(reader: RangeReader, config: Any, weight_map: dict[str, str] | None,
                   sizes: dict[str, int | None]) -> dict[str, Any]:
    """The scored tensors of a revision (shard, absolute byte range, dtype, shape) and the checkpoint's size, from
    the shard index (or the single file), the headers of the shards that hold scored tensors, and the file sizes
    of the model info (where it lacks one, the shard is measured by its header request)."""
    layout, dims = layout_for_config(config)

    def scored(tensor: str) -> bool:
        found = layout.match_tensor(tensor)
        return bool(found) and found[2] == "weight" and found[1].role in SCORED_ROLES and found[0] < dims.num_layers

    all_shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    shards = [f for f in all_shards if weight_map is None or f in {f for t, f in weight_map.items() if scored(t)}
              or sizes.get(f) is None]
    with ThreadPoolExecutor(min(HEADER_REQUEST_THREADS, len(shards))) as pool:
        headers = dict(zip(shards, pool.map(lambda shard: read_header(reader, shard), shards)))
    tensors = {}
    for shard, (data_start, header, _) in headers.items():
        for tensor, meta in header.items():
            if tensor == "__metadata__" or not scored(tensor):
                continue
            if weight_map is not None and weight_map.get(tensor) != shard:
                continue
            start, stop = meta["data_offsets"]
            tensors[tensor] = {"layer": layout.match_tensor(tensor)[0], "shard": shard, "start": data_start + start,
                               "stop": data_start + stop, "dtype": meta["dtype"], "shape": meta["shape"]}
    return {"format": 1, "repo": reader.repo_id, "commit": reader.commit,
            "checkpoint_bytes": sum(headers[f][2] if f in headers else sizes[f] for f in all_shards), "tensors": tensors}


def manifest_entries(manifest: dict[str, Any]) -> list[Entry]:
    return [Entry(name, m["layer"], m["shard"], m["start"], m["stop"], m["dtype"], tuple(m["shape"]))
            for name, m in manifest["tensors"].items()]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest if manifest.get("format") == 1 and (folder / "config.json").is_file() else None
    except (OSError, ValueError):
        return None
