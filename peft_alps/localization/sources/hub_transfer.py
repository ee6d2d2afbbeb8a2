"""What localizing a Hub checkpoint cost: the bytes read from the network, and the line that reports them.

Every Hub attention source carries a :class:`Transfer` (``source.transfer``): how it was read (HTTP Range reads,
the attention cache, or whole shards from a server without Range support), the body bytes received in this run
(counted by :class:`peft_alps.localization.sources.hub_ranges.RangeReader`) and the checkpoint and q/k/v sizes behind them.
:func:`transfer_summary` turns them into the CLI's one-line report; :func:`bytes_read` feeds the progress bar.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_COUNT_LOCK = threading.Lock()


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
