"""Localize Hub checkpoints by reading only their q/k/v bytes: HTTP Range reads, cached per repo and commit.

A safetensors file starts with a JSON header that gives every tensor's byte offsets, so the q/k/v tensors of a
Hub checkpoint can be read without the rest (the MLPs and embeddings, ~90% of a Llama-style model's bytes):

1. the revision is resolved to its commit (``HfApi.model_info``; skipped when it is a commit sha whose attention
   is cached), ``config.json`` and the shard index come through ``hf_hub_download``, and each shard's header is
   read with two small Range requests; together they form the *manifest* of the scored tensors;
2. a background thread reads each layer's q/k/v byte ranges (adjacent ranges of a shard coalesced) at most
   :data:`READ_AHEAD` layers ahead of the scoring, and writes them as one small safetensors file per layer;
3. scoring reads those files exactly like a local checkpoint folder (memory maps, released per KV group), so the
   scores are bitwise those of the local folders and memory stays flat.

Everything goes through huggingface_hub's HTTP layer (``get_session`` via ``http_stream_backoff``,
``build_hf_headers``, ``hf_hub_url``), so ``revision``, tokens, ``HF_ENDPOINT``, proxies and the user agent are
those of the library. The cache lives beside the Hub cache, in
``$HF_HUB_CACHE/../peft-alps/attention/models--{org}--{name}/{commit}/`` (``config.json``, ``manifest.json``,
``layer-00000.safetensors``, ...), and ``refs/{revision}`` records the commit of a branch or tag. A layer file is
written as ``*.partial`` and renamed when complete, and it is used only when its size and header are exactly
the ones the manifest predicts; so a run that breaks off resumes at the first missing layer, and a second run of
a cached repo reads nothing from the network (not even the revision, when it is a commit sha).

With ``HF_HUB_OFFLINE=1``: a complete attention cache, else the shards in the Hugging Face cache, else a clear
error. A server that answers a Range request with the whole file (200) makes this fall back, with one warning,
to downloading whole shards. Repos with only pickle weights (``*.bin``) are refused; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import INDEX_FILE, SCORED_ROLES, SINGLE_FILE, SafetensorsSource, _hub_source, _read_index
from .layouts import layout_for_config

READ_AHEAD = 2  # layers read ahead of the scoring, per model
CHUNK = 1 << 20  # bytes per read from the network or a file
# Ranges of one shard are read as one request when the bytes between them are few: at most MAX_GAP, and at most
# 1/8 of the wanted bytes (so coalescing never reads more than 12.5% extra; a neighbouring o_proj is never read)
MAX_GAP = 1 << 20
HEADER_REQUEST_THREADS = 8
MANIFEST = "manifest.json"
_SHA = re.compile(r"^[0-9a-f]{40}$")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_warned_endpoints: set[str] = set()


class RangeNotSupported(OSError):
    """The server answered a ranged GET with the whole file."""


@dataclass
class Transfer:
    """What one Hub checkpoint cost: body bytes received from the network in this run, and the sizes behind them."""

    repo: str
    mode: str = "ranged"  # "ranged" | "cached" | "whole files"
    bytes_read: int = 0
    checkpoint_bytes: int | None = None  # all safetensors files of the revision
    attention_bytes: int | None = None  # the scored q/k/v tensors
    layers_fetched: int = 0
    layers_cached: int = 0
    cache_dir: Path | None = None

    def add(self, count: int) -> None:
        with _COUNT_LOCK:
            self.bytes_read += count


_COUNT_LOCK = threading.Lock()


def attention_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the attention caches live: ``peft-alps/attention`` beside the Hugging Face Hub cache."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser().parent / "peft-alps" / "attention"


# ------------------------------------------------------------------------------------------------ byte ranges


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


class RangeReader:
    """Byte ranges of one revision's files: from the Hugging Face cache when the file is there, else by HTTP Range
    through huggingface_hub's session. Counts network bytes into ``transfer``; ``stop`` aborts a read."""

    def __init__(self, repo_id: str, commit: str, cache_dir: str | None, transfer: Transfer):
        from huggingface_hub.utils import build_hf_headers

        from . import __version__

        self.repo_id, self.commit, self.cache_dir, self.transfer = repo_id, commit, cache_dir, transfer
        self.headers = build_hf_headers(library_name="peft-alps", library_version=__version__)
        self.headers["Accept-Encoding"] = "identity"  # the byte offsets are those of the stored file
        self.stop = threading.Event()

    def url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.commit)

    @contextmanager
    def open(self, filename: str, start: int, stop: int) -> Iterator[tuple[Iterator[bytes], int]]:
        """``(chunks, file size)`` of bytes ``[start, stop)`` of ``filename``; raises if fewer bytes arrive."""
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

        local = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.cache_dir, revision=self.commit)
        if isinstance(local, str):
            with open(local, "rb") as fh:
                yield self._checked(_file_chunks(fh, start, stop), stop - start, local, count=False), os.path.getsize(local)
            return
        url = self.url(filename)
        headers = {**self.headers, "Range": f"bytes={start}-{stop - 1}"}
        with http_stream_backoff("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            if response.status_code != 206:
                raise RangeNotSupported(f"{url} answered a ranged GET with HTTP {response.status_code}, not 206")
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match[1]) != start or int(match[2]) != stop - 1 or match[3] == "*":
                raise OSError(f"{url}: asked for bytes {start}-{stop - 1}, got Content-Range "
                              f"{response.headers.get('Content-Range')!r}")
            yield self._checked(response.iter_bytes(), stop - start, url, count=True), int(match[3])

    def _checked(self, chunks: Iterator[bytes], expected: int, where: str, count: bool) -> Iterator[bytes]:
        import httpx2

        got = 0
        try:
            for chunk in chunks:
                if self.stop.is_set():
                    raise InterruptedError("the source was closed")
                got += len(chunk)
                if count:
                    self.transfer.add(len(chunk))
                if got > expected:
                    raise OSError(f"{where}: more bytes than the {expected} asked for")
                yield chunk
        except httpx2.HTTPError as err:  # an OSError, which http_stream_backoff does not retry in the middle of a body
            raise OSError(f"the connection broke after {got} of {expected} bytes of {where} "
                          f"({type(err).__name__}: {err})") from err
        if got != expected:
            raise OSError(f"the connection ended after {got} of {expected} bytes of {where}")

    def read(self, filename: str, start: int, stop: int) -> tuple[bytes, int]:
        with self.open(filename, start, stop) as (chunks, size):
            return b"".join(chunks), size


def _file_chunks(fh, start: int, stop: int) -> Iterator[bytes]:
    fh.seek(start)
    while start < stop:
        chunk = fh.read(min(CHUNK, stop - start))
        if not chunk:
            return
        start += len(chunk)
        yield chunk


def read_header(reader: RangeReader, shard: str) -> tuple[int, dict[str, Any], int]:
    """``(data start, header, file size)`` of one safetensors file, with two small Range requests."""
    prefix, size = reader.read(shard, 0, 8)
    length = int.from_bytes(prefix, "little")
    if not 0 < length <= min(size - 8, 100 << 20):
        raise OSError(f"{reader.url(shard)} is not a safetensors file (header length {length}, file size {size})")
    header, _ = reader.read(shard, 8, 8 + length)
    try:
        return 8 + length, json.loads(header), size
    except ValueError as err:
        raise OSError(f"{reader.url(shard)}: the safetensors header is not JSON ({err})") from None


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (one per process: concurrent runs don't mix)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def write_layer(reader: RangeReader, path: Path, entries: list[Entry]) -> None:
    """Read one layer's tensors and write them as a safetensors file, renamed into place only when complete."""
    partial = _partial(path)
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


# ------------------------------------------------------------------------------------------------ read-ahead


class Fetcher:
    """Reads the missing layers in order on a background thread, at most :data:`READ_AHEAD` layers ahead of the
    highest layer asked for; :meth:`ensure` waits for a layer (and raises the error that stopped the thread)."""

    def __init__(self, missing: list[int], fetch, describe_failure):
        self._missing, self._fetch, self._describe = sorted(missing), fetch, describe_failure
        self._done: set[int] = set()
        self._wanted = -1
        self._error: tuple[int, BaseException] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="peft-alps-hub-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for layer in self._missing:
            with self._cond:
                while not self._closed and layer > self._wanted + READ_AHEAD:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self._fetch(layer)
            except BaseException as err:  # noqa: BLE001 - handed to the scoring thread by ensure()
                with self._cond:
                    self._error = (layer, err)
                    self._cond.notify_all()
                return
            with self._cond:
                self._done.add(layer)
                self._cond.notify_all()

    def ensure(self, layer: int) -> None:
        with self._cond:
            if layer > self._wanted:
                self._wanted = layer
                self._cond.notify_all()
            while layer in self._missing and layer not in self._done:
                if self._error is not None and layer >= self._error[0]:
                    failed, err = self._error
                    raise OSError(self._describe(failed, err)) from err
                self._cond.wait()

    def close(self, stop: threading.Event) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        stop.set()
        self._thread.join(timeout=30)


class HubAttentionSource(SafetensorsSource):
    """The scored tensors of a Hub checkpoint, served from the per-layer files of the attention cache, which a
    :class:`Fetcher` fills as the layers are asked for (no fetcher once every layer is cached)."""

    def __init__(self, folder: Path, name: str, entries: list[Entry], config: Any, transfer: Transfer,
                 reader: RangeReader | None = None):
        self.transfer, self._reader = transfer, reader
        self._fetcher: Fetcher | None = None  # set by _source when layers are missing
        files = {e.name: folder / layer_file_name(e.layer) for e in entries}
        self._layer_of = {path: e.layer for e, path in zip(entries, files.values())}
        super().__init__(folder, name=name, files=files, config=config)

    def _ready(self, layer: int) -> None:
        if self._fetcher is not None:
            self._fetcher.ensure(layer)

    def _span(self, path: Path, tensor_name: str):
        self._ready(self._layer_of[path])
        return super()._span(path, tensor_name)

    def layer(self, index: int):
        self._ready(index)
        return super().layer(index)

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close(self._reader.stop)
        super().close()


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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path)
    partial.write_bytes(data)
    os.replace(partial, path)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest if manifest.get("format") == 1 and (folder / "config.json").is_file() else None
    except (OSError, ValueError):
        return None


def _by_layer(entries: list[Entry]) -> dict[int, list[Entry]]:
    out: dict[int, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.layer, []).append(e)
    return out


def _missing_layers(folder: Path, entries: list[Entry]) -> list[int]:
    return [layer for layer, members in sorted(_by_layer(entries).items())
            if not layer_file_is_complete(folder / layer_file_name(layer), members)]


# ------------------------------------------------------------------------------------------------ entry point


def hub_source(repo_id: str, revision: str | None = None, cache_dir: str | None = None):
    """An attention source for a Hub repo id that reads only its q/k/v bytes (see the module docstring)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    name = repo_id if revision is None else f"{repo_id}@{revision}"
    root = attention_cache_root(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    if constants.is_offline_mode():
        return _offline_source(repo_id, revision, cache_dir, root, name)
    if revision is not None and _SHA.match(revision) and (cached := _cached_source(root / revision, name)):
        return cached
    commit, files = _resolve(repo_id, revision, name)
    if commit is None:  # the Hub could not be reached: whatever the caches hold
        return _offline_source(repo_id, revision, cache_dir, root, name, reason=files)
    _write_atomic(root / "refs" / (revision or "main"), commit.encode())
    if cached := _cached_source(root / commit, name):
        return cached
    transfer = Transfer(repo=name, cache_dir=root / commit)
    reader = RangeReader(repo_id, commit, cache_dir, transfer)
    try:
        manifest = _read_manifest(root / commit) or _new_manifest(reader, files, root / commit, name)
    except RangeNotSupported as err:
        return _whole_files(repo_id, commit, cache_dir, name, err)
    return _source(root / commit, name, manifest, reader, transfer)


def _resolve(repo_id: str, revision: str | None, name: str):
    """``(commit, {file: size})`` of the revision from the Hub, or ``(None, reason)`` when it cannot be reached."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from . import __version__

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
    from huggingface_hub import hf_hub_download

    from .checkpoints import _load_config

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
    _write_atomic(folder / "config.json", Path(config_path).read_bytes())
    config = _load_config(folder, name)
    weight_map = _read_index(Path(fetch(INDEX_FILE)), name) if INDEX_FILE in filenames else None
    manifest = build_manifest(reader, config, weight_map, filenames)
    _write_atomic(folder / MANIFEST, json.dumps(manifest).encode())
    return manifest


def _source(folder: Path, name: str, manifest: dict[str, Any], reader: RangeReader | None,
            transfer: Transfer) -> HubAttentionSource:
    from .checkpoints import _load_config

    entries = manifest_entries(manifest)
    missing = _missing_layers(folder, entries)
    transfer.checkpoint_bytes = manifest["checkpoint_bytes"]
    transfer.attention_bytes = sum(e.size for e in entries)
    transfer.layers_cached = len(_by_layer(entries)) - len(missing)
    transfer.cache_dir = folder
    source = HubAttentionSource(folder, name, entries, _load_config(folder, name), transfer, reader)
    if missing:  # (started once the source has checked that every layer's tensors are there)
        layers = _by_layer(entries)

        def fetch(layer: int) -> None:
            write_layer(reader, folder / layer_file_name(layer), layers[layer])
            transfer.layers_fetched += 1

        def describe(layer: int, err: BaseException) -> str:
            done = transfer.layers_cached + transfer.layers_fetched
            return (f"reading the q/k/v bytes of layer {layer} of Hub repo {name!r} failed ({type(err).__name__}: "
                    f"{err}). The {done} of {len(layers)} layers read completely are cached in {folder}; run the "
                    "same localization again to resume from the first missing layer.")

        source._fetcher = Fetcher(missing, fetch, describe)
    else:
        transfer.mode = "cached"
    return source


def _cached_source(folder: Path, name: str) -> HubAttentionSource | None:
    """The source of a complete attention cache, or None (nothing is read from the network)."""
    manifest = _read_manifest(folder)
    if manifest is None or _missing_layers(folder, manifest_entries(manifest)):
        return None
    return _source(folder, name, manifest, None, Transfer(repo=name))


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
    if commit is not None and (cached := _cached_source(root / commit, name)):
        return cached
    try:
        source = _hub_source(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear OSError
        manifest = _read_manifest(root / commit) if commit else None
        partly = ""
        if manifest is not None:
            entries = manifest_entries(manifest)
            total = len(_by_layer(entries))
            partly = (f" ({total - len(_missing_layers(root / commit, entries))} of {total} layers of its q/k/v "
                      f"tensors are in {root / commit}: the rest needs "
                      f"{format_bytes(sum(e.size for e in entries if e.layer in set(_missing_layers(root / commit, entries))))})")
        why = ("HF_HUB_OFFLINE=1 is set" if reason is None else f"the Hub could not be reached ({reason})")
        raise OSError(
            f"{repo_id!r} is not a local folder, and Hub repo {name!r} is not in the local cache{partly}; {why}, so "
            "nothing can be downloaded. Unset HF_HUB_OFFLINE (or reconnect) to read its q/k/v bytes, or pass a "
            f"local checkpoint folder. (Nor does the Hugging Face cache {hf_repo} hold its config and the shards "
            "with its attention tensors.)"
        ) from err
    source.transfer = Transfer(repo=name, mode="cached")
    return source


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
    source = _hub_source(repo_id, revision=commit, cache_dir=cache_dir)
    source.name = name
    downloaded = sum(p.stat().st_size for p in set(blobs.iterdir()) - before) if blobs.is_dir() else 0
    source.transfer = Transfer(repo=name, mode="whole files", bytes_read=downloaded)
    return source


# ------------------------------------------------------------------------------------------------ reporting


def format_bytes(count: float) -> str:
    return f"{count / 1e6:,.1f} MB" if count < 1e9 else f"{count / 1e9:,.2f} GB"


def bytes_read(*sources: Any) -> int:
    return sum(t.bytes_read for s in sources if (t := getattr(s, "transfer", None)) is not None)


def transfer_summary(*sources: Any) -> str | None:
    """One line for the CLI: the bytes read from the Hub against the checkpoints' total size (None: no Hub repo)."""
    transfers = [t for s in sources if (t := getattr(s, "transfer", None)) is not None]
    if not transfers:
        return None
    total = sum(t.bytes_read for t in transfers)
    sizes = [t.checkpoint_bytes for t in transfers]
    line = f"read {format_bytes(total)} from the Hub"
    if all(size is not None for size in sizes) and sum(sizes):
        line += f" of {format_bytes(sum(sizes))} of checkpoints ({100 * total / sum(sizes):.1f}%)"
    parts = []
    for t in transfers:
        how = {"cached": "all from the cache", "whole files": "whole shards (the server ignores Range)"}.get(
            t.mode, f"{t.layers_fetched} layers read, {t.layers_cached} from the cache")
        parts.append(f"{t.repo}: {format_bytes(t.bytes_read)}, {how}")
    return line + ": " + "; ".join(parts)
