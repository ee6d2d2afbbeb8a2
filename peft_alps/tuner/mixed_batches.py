"""Mixed-adapter batches: ``model(x, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``.

Each row of the batch runs with the adapter named for it, or with none for ``"__base__"``, as LoRA does. PEFT's
``PeftModel.forward`` / ``generate`` enter the tuner's ``_enable_peft_forward_hooks`` context with the call's
keyword arguments; :func:`adapter_names_hooks` checks the names and has every ALPS layer (and every
``modules_to_save`` wrapper) receive them, through forward pre-hooks that live only for that call.
:meth:`peft_alps.AlpsLayer._mixed_batch_forward` then applies each adapter's head-slice delta to its own rows.

Beam search repeats every input row ``num_beams`` times, so the names are repeated the same way (the encoder of an
encoder-decoder model still sees the original rows and gets the original names).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from peft_alps.tuner.layer import AlpsLayer

BASE = "__base__"


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def check_adapter_names(tuner: nn.Module, adapter_names: Any) -> list[str]:
    """``adapter_names`` as a list, or the error LoRA gives: training mode, not a list, an adapter that no layer has."""
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"Got adapter names of type {type(adapter_names)}, expected a list of str: one adapter name (or "
            f"{BASE!r} for the base model) per row of the batch."
        )
    adapter_names = list(adapter_names)
    known: set[str] = set()
    for layer in tuner.modules():
        if isinstance(layer, AlpsLayer):
            known |= set(layer.alps_delta.keys())
    unexpected = {name for name in adapter_names if name != BASE} - known
    if unexpected:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(sorted(map(str, unexpected)))} "
            f"(this model has {', '.join(sorted(known))}; use {BASE!r} for rows without adapter)"
        )
    return adapter_names


def _hook_all(modules: Iterator[nn.Module], adapter_names: list[str], handles: list) -> None:
    hook = partial(_inject_adapter_names, adapter_names=adapter_names)
    for module in modules:
        if isinstance(module, (AlpsLayer, AuxiliaryTrainingWrapper)):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))


def _encoder(model: nn.Module) -> nn.Module | None:
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return None if encoder is model else encoder  # transformers 5: decoder-only models return themselves


@contextlib.contextmanager
def adapter_names_hooks(tuner: nn.Module, **kwargs: Any) -> Iterator[None]:
    """The body of ``AlpsModel._enable_peft_forward_hooks``: ``kwargs`` are the forward/generate call's."""
    adapter_names = kwargs.get("adapter_names", None)
    if adapter_names is None:
        yield
        return
    adapter_names = check_adapter_names(tuner, adapter_names)
    num_beams = kwargs.get("num_beams", None)
    per_row = adapter_names
    if isinstance(num_beams, int) and num_beams > 1:
        per_row = [name for name in adapter_names for _ in range(num_beams)]
    handles: list = []
    try:
        _hook_all(tuner.modules(), per_row, handles)
        encoder = _encoder(tuner.model)
        if encoder is not None and per_row is not adapter_names:
            _hook_all(encoder.modules(), adapter_names, handles)  # registered later, so these run last and win
        yield
    finally:
        for handle in handles:
            handle.remove()
