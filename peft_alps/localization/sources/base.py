"""What every attention source is: :class:`AttentionSource` hands out the rows of one scored projection of one layer
(localization asks for one KV group at a time) or a whole layer, and the checks every source applies to what it
reads (one tensor per slot, finite values).

Heads are located only through the head-layout registry (:mod:`peft_alps.layouts`), so every registered family works,
including fused (``qkv``) and transposed (GPT-2 ``Conv1D``) storage. The sources: :mod:`.folder` (a checkpoint
folder), :mod:`.module` (a live model), :mod:`.hub` (a Hub repo by byte ranges) and :mod:`.hub_whole_files`; :mod:`.open`
picks one.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import torch

from peft_alps.layouts import HeadDims, HeadLayout, Projection, layout_for_config

SCORED_ROLES = ("q", "k", "v", "qkv", "qkv_grouped")  # the projections a head's score is built from
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

LayerTensors = dict[Projection, torch.Tensor]  # stored weight of each scored projection of one layer
LAYER_CACHE = 3  # layers kept by AttentionSource.rows (threads score neighbouring layers at the same time)


class AttentionSource:
    """The scored attention weights of one model, served a layer at a time.

    Attributes:
        name: identifier recorded in the head scores (folder path, repo id or model name).
        config: the transformers config.
        layout, dims: the head layout and geometry from the registry.
    """

    name: str
    config: Any
    layout: HeadLayout
    dims: HeadDims

    def _init_layout(self, config: Any) -> None:
        self.config = config
        self.layout, self.dims = layout_for_config(config)
        self.projections = tuple(p for p in self.layout.projections if p.role in SCORED_ROLES)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, LayerTensors] = OrderedDict()

    def layer(self, index: int) -> LayerTensors:
        """Stored weights (storage orientation; ``Projection.transposed`` says how) of one layer's scored
        projections, checked to be finite."""
        raise NotImplementedError

    def rows(self, layer: int, proj: Projection, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of one scored projection's weight in ``[out, in]`` orientation, in the stored dtype,
        checked to be finite. Safe to call from several threads.

        This default slices :meth:`layer`, keeping the last few layers read (shared by the threads that score
        their heads)."""
        return _pick_rows(self._oriented(layer, proj), rows)

    def shape(self, layer: int, proj: Projection) -> tuple[int, ...]:
        """Shape of one scored projection's weight in ``[out, in]`` orientation."""
        return tuple(self._oriented(layer, proj).shape)

    def _oriented(self, layer: int, proj: Projection) -> torch.Tensor:
        with self._lock:
            tensors = self._cache.get(layer)
            if tensors is None:
                tensors = self._cache[layer] = self.layer(layer)
                while len(self._cache) > LAYER_CACHE:
                    self._cache.popitem(last=False)
        stored = tensors[proj]
        return stored.t() if proj.transposed and stored.dim() == 2 else stored

    def release(self) -> None:
        """Let go of the memory behind the views this thread got from :meth:`rows` (no-op here)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def claim_slot(slots: dict, slot: tuple[int, Projection], name: str, value: Any, source: AttentionSource) -> None:
    """Refuse a second tensor/module for the same (layer, projection): e.g. a multimodal model whose vision tower
    also has ``layers.N.self_attn.q_proj`` (added by the architectures helper; silently overwriting mixed them)."""
    if slot in slots and slots[slot][0] != name:
        raise ValueError(
            f"{source.name!r}: {slots[slot][0]!r} and {name!r} both match layer {slot[0]}'s {slot[1].path} of the "
            f"{source.config.model_type} head layout (a vision tower next to the language model?). Localize the "
            "language model alone: pass its sub-model (e.g. model.language_model) or a checkpoint of it."
        )


def sum_is_finite(tensor: torch.Tensor) -> bool:
    """A cheap necessary test for finite weights: a plain sum is NaN/inf if any entry is, and otherwise only if it
    overflows (the caller then counts exactly). ~40x cheaper than ``isfinite()``. (A float16 sum is taken in
    float32: 65504 is within reach.)"""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()
    return math.isfinite(float(total))


def check_finite(tensor: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """Refuse NaN/inf weights, naming the tensor and counting them (see :func:`sum_is_finite`)."""
    if not tensor.is_floating_point():
        return tensor
    if not sum_is_finite(tensor) and (bad := int((~torch.isfinite(tensor)).sum())):
        raise ValueError(
            f"tensor {name!r} of {where} has {bad} NaN/inf value(s); head scores need finite weights. "
            "Check the checkpoint (a diverged fine-tune or a broken conversion)."
        )
    return tensor


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs of a row list, in order."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _pick_rows(weight: torch.Tensor, rows: list[int]) -> torch.Tensor:
    runs = row_runs(rows)
    if len(runs) == 1:  # a view, no copy
        return weight[runs[0][0] : runs[0][1]]
    return weight.index_select(0, torch.tensor(rows, dtype=torch.long))
