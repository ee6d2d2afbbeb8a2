"""Checks of ``peft-alps`` options that need nothing but the standard library.

The ``argparse`` types (:func:`ratio`, :func:`fraction`, :func:`projections`, ...) reject a bad value while the
command line is parsed, with a message that names the value, the valid range and the fix. :func:`check_writable`
checks an output path before a command starts any work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ATTENTION_ROLES = ("q", "k", "v", "o")  # = peft_alps.warmup.train.ATTENTION_ROLES (tests keep them equal)


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def ratio(text: str) -> float:
    """A retention ratio: the fraction of all heads to select, in (0, 1]."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text} (the fraction of all heads, e.g. 0.1)")
    return value


def fraction(text: str) -> float:
    """A share of the training data, in (0, 1]."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text} (the share of the data, e.g. 0.1 for 10%)")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def projections(text: str) -> tuple[str, ...]:
    """A comma-separated, non-empty subset of q,k,v,o (``"q,k,v"``), in that order."""
    roles = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [role for role in roles if role not in ATTENTION_ROLES]
    if unknown or not roles:
        problem = (f"unknown projection{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in {text!r}"
                   if unknown else f"no projection in {text!r}")
        raise argparse.ArgumentTypeError(
            f"{problem}; choose a comma-separated subset of {','.join(ATTENTION_ROLES)}, e.g. q,k,v")
    return tuple(role for role in ATTENTION_ROLES if role in roles)


def check_writable(path: str | os.PathLike, option: str, *, folder: bool = False) -> None:
    """Raise ``OSError`` unless ``path`` can be written: as a file (``folder=False``) or as a folder that may not
    exist yet. Probes the nearest existing folder with a temporary file, so read-only places (``/proc``, a
    read-only mount) are caught, also for root; creates nothing that stays."""
    target = Path(path).expanduser()
    if target.is_dir() and not folder:
        raise OSError(f"{option} {str(path)!r} is a folder; pass a file path, e.g. {str(target / 'heads.json')!r}")
    if target.exists() and not target.is_dir() and folder:
        raise OSError(f"{option} {str(path)!r} is a file; pass a folder (it is created if missing)")
    anchor = target if target.is_dir() else target.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OSError(f"{option} {str(path)!r} cannot be created: {str(anchor)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=anchor):
            pass
    except OSError as err:
        raise OSError(f"{option} {str(path)!r} is not writable ({str(anchor)!r}: {err.strerror or err}); "
                      "pick a folder you can write to") from None
    if target.is_file() and not os.access(target, os.W_OK):
        raise OSError(f"{option} {str(path)!r} exists and is read-only; pick another path or make it writable")
