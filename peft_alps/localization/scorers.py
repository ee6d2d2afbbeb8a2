"""Head selectors beyond the paper that need nothing more than what a warm-up already has.

:func:`peft_alps.localize_heads` (PAD, the paper's method) compares the *distributions* of each head's weights in
a base and a task model. The two selectors here are cheaper, cruder signals, offered for comparison
(``benchmarks/reproduce_real.py`` measures them against PAD on SmolLM2-135M):

- :func:`weight_change_scores`: the Frobenius norm of how far the task model (e.g. a warm-up checkpoint) moved
  each head's parameters ``theta_h = {W_q^h, W_k^kv(h), W_v^kv(h)}`` (the paper's head parameter set).
- :func:`gradient_scores`: the norm of the loss gradient with respect to ``theta_h`` at the *base* weights,
  summed over a few batches: no training at all.

Both return :class:`~peft_alps.HeadScores` (higher = more task-specific), so ``top_k`` / ``AlpsConfig(head_scores=
...)`` work as for PAD scores. PAD stays the default everywhere.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch

from peft_alps.localization.sources.base import SCORED_ROLES
from peft_alps.localization.sources.open import open_source
from peft_alps.layouts import HeadDims, Projection, head_parts, layout_for_config
from peft_alps.localization.pad import check_same_geometry
from peft_alps.scores import HeadScores

RowReader = Callable[[int, Projection, list[int]], torch.Tensor]


def _head_square_sums(dims: HeadDims, projections: Iterable[Projection], read: RowReader) -> np.ndarray:
    """``sum ||read(layer, proj, rows)||^2`` over the q rows of each query head and the k/v rows of its KV group."""
    out = np.zeros((dims.num_layers, dims.num_heads), dtype=np.float64)
    for layer in range(dims.num_layers):
        for proj in projections:
            for head in range(dims.num_heads):
                for part, (_, rows) in head_parts(proj.role, dims, head).items():
                    if part in ("q", "k", "v"):
                        out[layer, head] += float(read(layer, proj, rows).double().square().sum())
    return out


def weight_change_scores(base: Any, task: Any) -> HeadScores:
    """Score each head by ``||theta_h(task) - theta_h(base)||_F`` (q rows of the head, k/v rows of its KV group).

    Args:
        base, task: checkpoint folders (the task may hold only the attention tensors, e.g. a saved
            :class:`~peft_alps.WarmupCheckpoint`), Hub repo ids or in-memory transformers models of the same
            attention geometry, as for :func:`~peft_alps.localize_heads`.
    """
    with open_source(base) as base_src, open_source(task) as task_src:
        check_same_geometry(base_src, task_src)

        def diff(layer: int, proj: Projection, rows: list[int]) -> torch.Tensor:
            try:
                return task_src.rows(layer, proj, rows).double() - base_src.rows(layer, proj, rows).double()
            finally:
                base_src.release()
                task_src.release()

        sums = _head_square_sums(base_src.dims, base_src.projections, diff)
        return HeadScores(scores=np.sqrt(sums), metric="weight_change", variant="qkv", tau=1.0,
                          base=base_src.name, task=task_src.name, model_type=base_src.config.model_type,
                          head_dims=base_src.dims.as_dict())


def _attention_weights(model: torch.nn.Module) -> tuple[Any, HeadDims, dict[tuple[int, Projection], torch.nn.Parameter]]:
    layout, dims = layout_for_config(model.config)
    weights = {}
    for name, module in model.named_modules():
        found = layout.match(name)
        if found and found[1].role in SCORED_ROLES and found[0] < dims.num_layers:
            base_layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            weights[found] = base_layer.weight
    missing = [(layer, p.path) for layer in range(dims.num_layers) for p in layout.projections
               if p.role in SCORED_ROLES and (layer, p) not in weights]
    if missing:
        raise ValueError(f"model lacks the attention weight {layout.layers}.{missing[0][0]}.{missing[0][1]}; "
                         "gradient_scores needs every layer's q/k/v projections")
    return layout, dims, weights


def gradient_scores(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], *,
                    num_batches: int | None = None) -> HeadScores:
    """Score each head by the norm of the loss gradient w.r.t. ``theta_h``, accumulated over ``batches``.

    Args:
        model: a transformers causal LM (its weights, ``requires_grad`` flags and train/eval mode are left as
            they were; the gradient is taken in eval mode, i.e. without dropout).
        batches: dicts of model inputs with ``labels`` (``model(**batch).loss`` is differentiated), e.g. the
            first few batches of the task data.
        num_batches: use at most this many batches (default: all of ``batches``).
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    layout, dims, weights = _attention_weights(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    grads = {key: torch.zeros_like(w, dtype=torch.float64) for key, w in weights.items()}
    used = 0
    try:
        model.requires_grad_(False)
        model.eval()
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            loss = model(**batch).loss
            got = torch.autograd.grad(loss, list(weights.values()))
            for key, g in zip(weights, got):
                grads[key] += g.double()
            used += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if used == 0:
        raise ValueError("gradient_scores got no batches; pass at least one batch of inputs with labels")

    def read(layer: int, proj: Projection, rows: list[int]) -> torch.Tensor:
        g = grads[(layer, proj)]
        return (g.t() if proj.transposed else g)[rows]

    projections = [p for p in layout.projections if p.role in SCORED_ROLES]
    sums = _head_square_sums(dims, projections, read)
    return HeadScores(scores=np.sqrt(sums), metric="gradient_norm", variant="qkv", tau=1.0,
                      base=getattr(model.config, "_name_or_path", None) or type(model).__name__, task=None,
                      model_type=model.config.model_type, head_dims=dims.as_dict())
