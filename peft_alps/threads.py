"""``torch_threads``: run a block on a given number of torch CPU threads, then give the caller's count back.

Localization runs on one thread so that its sums never depend on the thread count; the demos run on the count a
user asked for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` torch CPU threads (None or 0: leave the count as it is), then restore the count."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
