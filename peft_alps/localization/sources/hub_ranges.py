"""Byte ranges of a Hub revision's files over HTTP Range, through huggingface_hub's own HTTP layer.

:class:`RangeReader` serves bytes ``[start, stop)`` of one file of one commit: from the Hugging Face cache when
the file is there, else with a ranged GET (``get_session`` via ``http_stream_backoff``, ``build_hf_headers``,
``hf_hub_url``, so tokens, ``HF_ENDPOINT``, proxies and the user agent are those of the library). It detects a
server without Range support (an answer other than 206 raises :class:`RangeNotSupported`, which the caller turns
into a fallback), checks ``Content-Range`` and the body length, counts the network bytes into a
:class:`peft_alps.localization.sources.hub_transfer.Transfer`, and aborts a read when :attr:`RangeReader.stop` is set.
:func:`read_header` reads a safetensors header with two small requests.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft_alps.localization.sources.hub_transfer import Transfer

CHUNK = 1 << 20  # bytes per read from the network or a file


class RangeNotSupported(OSError):
    """The server answered a ranged GET with the whole file."""


class RangeReader:
    """Byte ranges of one revision's files: from the Hugging Face cache when the file is there, else by HTTP Range
    through huggingface_hub's session. Counts network bytes into ``transfer``; ``stop`` aborts a read."""

    def __init__(self, repo_id: str, commit: str, cache_dir: str | None, transfer: Transfer):
        from huggingface_hub.utils import build_hf_headers

        from peft_alps._version import __version__

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
