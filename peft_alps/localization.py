"""Localize task-sensitive attention heads: the PAD score of every head of a base/task model pair.

For each query head ``h`` of each layer (see ``shared/ALPS_METHOD.md`` for the method):

1. per-head matrix, from the base and from the task weights
   (``variant="qkv_product"``, the paper) ``Wo_h = Wq_h^T @ (Wk_kv(h) @ Wv_kv(h)^T)``, ``d x d_h``; or
   (``variant="qkv_concat"``, the authors' released script, with GQA's ``kv(h)`` applied) the flattened
   ``Wq_h``, ``Wk_kv(h)``, ``Wv_kv(h)`` slices one after the other;
2. tempered softmax over all its entries, ``P_h = softmax(vec(W_h) / tau)``;
3. the distance between the base's and the task's ``P_h``: by default the Wasserstein-1 distance on the unit
   support ``x_i = i / (N - 1)``, exactly ``sum_i |CDF_B(i) - CDF_T(i)| / (N - 1)``.

The computation is vectorized over the heads of a layer and streams one layer of each model at a time. It is
done in float64 and is bitwise reproducible: it does not depend on the number of torch threads (matrix
products run single-threaded, every long sum is a sequential cumulative sum, everything else is
element-wise or an exact max).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from .checkpoints import AttentionSource, LayerTensors, open_source
from .layouts import HeadDims, head_parts
from .scores import HeadScores

Metric = Literal["wasserstein", "kl", "js", "cosine", "euclidean"]
Variant = Literal["qkv_product", "qkv_concat"]
METRICS: tuple[str, ...] = ("wasserstein", "kl", "js", "cosine", "euclidean")
VARIANTS: tuple[str, ...] = ("qkv_product", "qkv_concat")

# Heads of a layer are scored in chunks of at most this many float64 entries per model (bounds memory).
CHUNK_ENTRIES = 1 << 20


# ------------------------------------------------------------------------------------------ deterministic math


@contextlib.contextmanager
def _single_thread():
    """Matrix products give bitwise different sums with different thread counts (MKL splits long inner
    dimensions across threads); run them on one thread so scores never depend on ``torch.get_num_threads()``."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rowsum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a fixed sequential order (a cumulative sum's last entry).

    ``torch.sum`` splits a long row across threads, so its rounding depends on the thread count; a cumulative
    sum is a sequential scan along the row (rows run in parallel, each one start to end)."""
    return torch.cumsum(x, dim=-1)[..., -1]


def _shifted(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``(x - max) / tau`` row-wise, in place (the max is exact in any order)."""
    x.sub_(x.amax(dim=-1, keepdim=True))
    if tau != 1.0:
        x.div_(tau)
    return x


def _log_softmax(x: torch.Tensor, tau: float) -> torch.Tensor:
    x = _shifted(x, tau)
    return x.sub_(torch.log(_rowsum(torch.exp(x)))[..., None])


def wasserstein_rows(x_b: torch.Tensor, x_t: torch.Tensor, tau: float) -> torch.Tensor:
    """W1 between ``softmax(x_b / tau)`` and ``softmax(x_t / tau)`` (rows) on the support ``i / (N - 1)``.

    Exactly ``sum_i |CDF_B(i) - CDF_T(i)| / (N - 1)`` (the last CDF entries are both exactly 1, so the last gap is
    0). The CDFs are cumulative sums of ``exp`` in float64, normalized in place. Overwrites the inputs."""
    n = x_b.shape[-1]
    if n < 2:
        return torch.zeros(x_b.shape[0], dtype=torch.float64)
    c_b = _shifted(x_b, tau).exp_().cumsum_(dim=-1)
    c_t = _shifted(x_t, tau).exp_().cumsum_(dim=-1)
    # normalize both the same way, so that identical heads give exactly 0 (no fused multiply-add here)
    gap = c_b.div_(c_b[..., -1:].clone()).sub_(c_t.div_(c_t[..., -1:].clone()))
    with _single_thread():  # one thread: a vectorized but fixed-order reduction
        return torch.linalg.vector_norm(gap, ord=1, dim=-1) / (n - 1)


def _distance(x_b: torch.Tensor, x_t: torch.Tensor, metric: str, tau: float) -> torch.Tensor:
    """Row-wise distance between ``softmax(x_b / tau)`` and ``softmax(x_t / tau)`` ([heads, N] -> [heads]).
    Overwrites the inputs."""
    if metric == "wasserstein":
        return wasserstein_rows(x_b, x_t, tau)
    logp_b, logp_t = _log_softmax(x_b, tau), _log_softmax(x_t, tau)
    p_b, p_t = torch.exp(logp_b), torch.exp(logp_t)
    if metric == "kl":
        return _rowsum(p_b * (logp_b - logp_t))
    if metric == "js":
        log_m = torch.logaddexp(logp_b, logp_t) - math.log(2.0)
        return 0.5 * _rowsum(p_b * (logp_b - log_m)) + 0.5 * _rowsum(p_t * (logp_t - log_m))
    if metric == "cosine":
        dot = _rowsum(p_b * p_t)
        return 1.0 - dot / torch.sqrt(_rowsum(p_b * p_b) * _rowsum(p_t * p_t))
    if metric == "euclidean":
        return torch.sqrt(_rowsum((p_b - p_t) ** 2))
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


# ------------------------------------------------------------------------------------------ per-head matrices


class LayerHeads:
    """The q/k/v slices of every head of one layer, float64, in ``[out, in]`` orientation.

    ``q``: ``[num_heads, head_dim, hidden]`` (query head ``h``); ``k``, ``v``: ``[num_kv_heads, head_dim,
    hidden]`` (KV group ``g``). Built only from :func:`peft_alps.layouts.head_parts`, so fused and transposed
    projections of any registered family work.
    """

    def __init__(self, tensors: LayerTensors, dims: HeadDims, where: str):
        pieces: dict[str, torch.Tensor] = {}
        # a representative query head for every KV group: its k/v pieces are the group's
        heads = {"q": list(range(dims.num_heads)), "k": [g * dims.group_size for g in range(dims.num_kv_heads)]}
        heads["v"] = heads["k"]
        for proj, stored in tensors.items():
            weight = stored.t() if proj.transposed else stored
            expected_rows = _expected_rows(proj.role, dims)
            if weight.dim() != 2 or weight.shape[0] != expected_rows:
                raise ValueError(
                    f"{where}: {proj.path} weight has shape {list(stored.shape)}"
                    f"{' (stored transposed)' if proj.transposed else ''}, expected {expected_rows} output rows "
                    f"for {dims.num_heads} heads / {dims.num_kv_heads} KV heads of head_dim {dims.head_dim}"
                )
            for part in head_parts(proj.role, dims, 0):
                if part == "o":
                    continue
                rows = [row for h in heads[part] for row in head_parts(proj.role, dims, h)[part][1]]
                if rows == list(range(rows[0], rows[0] + len(rows))):  # one block of rows: a view, no gather
                    picked = weight[rows[0] : rows[0] + len(rows)]
                else:
                    picked = weight.index_select(0, torch.tensor(rows, dtype=torch.long))
                shape = (len(heads[part]), dims.head_dim, weight.shape[1])
                # kept in the stored dtype: float64 copies are made one chunk of heads at a time
                pieces[part] = picked.reshape(shape)
        missing = [part for part in ("q", "k", "v") if part not in pieces]
        if missing:
            raise ValueError(f"{where}: no projection provides the {'/'.join(missing)} weights of the heads")
        self.q, self.k, self.v = pieces["q"], pieces["k"], pieces["v"]
        self.dims = dims
        self._kv: torch.Tensor | None = None

    @property
    def hidden(self) -> int:
        return self.q.shape[-1]

    def entries(self, variant: str) -> int:
        d, d_h = self.hidden, self.dims.head_dim
        return d * d_h if variant == "qkv_product" else 3 * d_h * d

    def matrices(self, variant: str, heads: range) -> torch.Tensor:
        """``[len(heads), N]`` flattened per-head matrices (row-major)."""
        groups = torch.tensor([self.dims.kv_group(h) for h in heads], dtype=torch.long)
        q = self.q[heads.start : heads.stop]
        if variant == "qkv_product":
            with _single_thread():
                if self._kv is None:  # [g, d_h, d_h] = Wk_g @ Wv_g^T
                    self._kv = torch.bmm(self.k.double(), self.v.double().transpose(1, 2))
                q = q.to(torch.float64)
                return torch.bmm(q.transpose(1, 2), self._kv.index_select(0, groups)).reshape(len(heads), -1)
        if variant == "qkv_concat":
            out = torch.empty(len(heads), self.entries(variant), dtype=torch.float64)
            size = self.dims.head_dim * self.hidden
            out[:, :size] = q.reshape(len(heads), -1)  # the copy converts to float64
            out[:, size : 2 * size] = self.k.index_select(0, groups).reshape(len(heads), -1)
            out[:, 2 * size :] = self.v.index_select(0, groups).reshape(len(heads), -1)
            return out
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _expected_rows(role: str, dims: HeadDims) -> int:
    n, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    return {"q": n * d, "k": g * d, "v": g * d, "qkv": (n + 2 * g) * d, "qkv_grouped": (n + 2 * g) * d}[role]


def score_layer(base: LayerHeads, task: LayerHeads, metric: str = "wasserstein", variant: str = "qkv_product",
                tau: float = 1.0) -> np.ndarray:
    """PAD scores (float64, ``[num_heads]``) of one layer from the base's and the task's head slices."""
    n = base.dims.num_heads
    chunk = max(1, CHUNK_ENTRIES // base.entries(variant))
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        heads = range(start, min(n, start + chunk))
        out[start : heads.stop] = _distance(base.matrices(variant, heads), task.matrices(variant, heads), metric, tau)
    return out.numpy()


# ------------------------------------------------------------------------------------------------ public API


def _check_args(metric: str, variant: str, tau: float) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a positive finite number (softmax temperature, default 1.0), got {tau!r}")


def check_same_geometry(base: AttentionSource, task: AttentionSource) -> None:
    """Refuse a base/task pair whose layers, heads, KV heads or head_dim differ (naming the first difference)."""
    diffs = [
        f"{key}: base {getattr(base.dims, key)} vs task {getattr(task.dims, key)}"
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim")
        if getattr(base.dims, key) != getattr(task.dims, key)
    ]
    if base.layout != task.layout:
        diffs.insert(0, f"model_type: base {base.config.model_type!r} vs task {task.config.model_type!r}")
    if diffs:
        raise ValueError(
            f"base {base.name!r} and task {task.name!r} do not have the same attention geometry ({'; '.join(diffs)}). "
            "ALPS compares a base model with a fine-tune of the same architecture."
        )


def localize_heads(
    base: Any,
    task: Any,
    *,
    metric: Metric = "wasserstein",
    variant: Variant = "qkv_product",
    tau: float = 1.0,
    progress: bool | Callable = False,
    revision: str | None = None,
    task_revision: str | None = None,
) -> HeadScores:
    """Score every attention head by how far the task model moved it from the base model (no data needed).

    Args:
        base, task: each a checkpoint folder (``config.json`` + safetensors; the task may hold only the attention
            tensors), a Hugging Face Hub repo id (only the config and the shards with attention tensors are
            fetched; works offline from the cache) or an in-memory transformers model. Both must have the same
            attention geometry.
        metric: ``"wasserstein"`` (PAD, default), ``"kl"`` (KL(P_B || P_T)), ``"js"``, ``"cosine"`` (1 - cosine
            similarity of the distributions) or ``"euclidean"``.
        variant: ``"qkv_product"`` (the paper's ``Wq_h^T Wk Wv^T``, default) or ``"qkv_concat"`` (flattened
            q/k/v slices, as in the authors' released script, with the right KV group under GQA).
        tau: softmax temperature (> 0).
        progress: show a tqdm bar over layers (or pass a tqdm-like wrapper).
        revision, task_revision: Hub revisions of the base and the task repo.

    Returns:
        :class:`HeadScores` with ``scores`` a float64 numpy array ``[num_layers, num_heads]``; higher means more
        task-specific. Pass it (or its saved JSON) to ``AlpsConfig(head_scores=..., ratio=0.1)``.
    """
    _check_args(metric, variant, tau)
    tau = float(tau)
    with open_source(base, revision=revision) as base_src, open_source(task, revision=task_revision) as task_src:
        check_same_geometry(base_src, task_src)
        dims = base_src.dims
        layers = range(dims.num_layers)
        if progress:
            from tqdm.auto import tqdm

            wrap = progress if callable(progress) else tqdm
            layers = wrap(layers, desc="scoring heads", unit="layer")
        scores = np.empty((dims.num_layers, dims.num_heads), dtype=np.float64)
        for layer in layers:
            heads_b = LayerHeads(base_src.layer(layer), dims, f"layer {layer} of base {base_src.name!r}")
            heads_t = LayerHeads(task_src.layer(layer), dims, f"layer {layer} of task {task_src.name!r}")
            if heads_b.hidden != heads_t.hidden:
                raise ValueError(
                    f"base {base_src.name!r} and task {task_src.name!r} differ in hidden size "
                    f"({heads_b.hidden} vs {heads_t.hidden}); ALPS compares models of the same architecture"
                )
            scores[layer] = score_layer(heads_b, heads_t, metric, variant, tau)
            del heads_b, heads_t
        return HeadScores(
            scores=scores,
            metric=metric,
            variant=variant,
            tau=tau,
            base=base_src.name,
            task=task_src.name,
            model_type=base_src.config.model_type,
            head_dims=dims.as_dict(),
        )
