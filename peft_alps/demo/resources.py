"""What one step of work costs, for the demos' and benchmarks' tables: wall time, CPU time, extra peak resident
memory (``measure``) and trainable parameters (``trainable_parameters``).

Peak memory is the process's peak RSS (``VmHWM``) during the step minus its RSS at the start. The peak is reset
before the step by writing ``5`` to ``/proc/self/clear_refs`` (Linux); freed heap is first handed back to the
system (``malloc_trim``), so that memory a previous step freed but kept does not hide this step's growth.
Where either is unavailable the figure is ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Usage:
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process, all threads (user + system)
    extra_peak_bytes: int | None = None


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def measure() -> Iterator[Usage]:
    """``with measure() as usage: ...``; afterwards ``usage`` holds the step's seconds, CPU seconds and memory."""
    usage = Usage()
    _trim_heap()
    start_rss = _status_bytes("VmRSS")
    can_peak = start_rss is not None and _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - wall
        usage.cpu_seconds = time.process_time() - cpu
        peak = _status_bytes("VmHWM") if can_peak else None
        usage.extra_peak_bytes = max(peak - start_rss, 0) if peak is not None else None


def trainable_parameters(model) -> int:
    """Elements in the parameters that require grad (a plain module, a ``PeftModel`` or a merged model alike)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
