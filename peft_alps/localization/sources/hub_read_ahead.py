"""The attention source of a Hub revision: the attention cache's layer files, filled ahead of the scoring.

:func:`open_cache` turns a per-commit attention cache (:mod:`peft_alps.localization.sources.hub_cache`) into a
:class:`HubAttentionSource`, which scoring reads exactly like a local checkpoint folder (memory maps, released per
KV group; so the scores are bitwise those of the local folders and memory stays flat). When layers are missing,
a :class:`Fetcher` reads them in order on a background thread, at most :data:`READ_AHEAD` layers ahead of the
highest layer the scoring has asked for, and a failure names the layers already cached and how to resume.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from peft_alps.localization.sources.hub_cache import (Entry, by_layer, layer_file_name, manifest_entries, missing_layers, read_manifest,
                              write_layer)
from peft_alps.localization.sources.folder import SafetensorsSource, load_config
from peft_alps.localization.sources.hub_transfer import Transfer
from peft_alps.localization.sources.hub_ranges import RangeReader

READ_AHEAD = 2  # layers read ahead of the scoring, per model


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
        self._fetcher: Fetcher | None = None  # set by open_cache when layers are missing
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


def open_cache(folder: Path, name: str, manifest: dict[str, Any], reader: RangeReader | None,
               transfer: Transfer) -> HubAttentionSource:
    """The source of the attention cache in ``folder``, with a :class:`Fetcher` for its missing layers (``reader``
    reads them; it may be None only when none is missing)."""

    entries = manifest_entries(manifest)
    missing = missing_layers(folder, entries)
    transfer.checkpoint_bytes = manifest["checkpoint_bytes"]
    transfer.attention_bytes = sum(e.size for e in entries)
    transfer.layers_cached = len(by_layer(entries)) - len(missing)
    transfer.cache_dir = folder
    source = HubAttentionSource(folder, name, entries, load_config(folder, name), transfer, reader)
    if missing:  # (started once the source has checked that every layer's tensors are there)
        layers = by_layer(entries)

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


def open_complete_cache(folder: Path, name: str) -> HubAttentionSource | None:
    """The source of a complete attention cache, or None (nothing is read from the network)."""
    manifest = read_manifest(folder)
    if manifest is None or missing_layers(folder, manifest_entries(manifest)):
        return None
    return open_cache(folder, name, manifest, None, Transfer(repo=name))
