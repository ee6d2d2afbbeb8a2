"""Localize task-sensitive attention heads: the PAD score of every head of a base/task model pair.

For each query head ``h`` of each layer (see ``docs/method.md`` for the method):

1. per-head matrix, from the base and from the task weights
   (``variant="qkv_product"``, the paper) ``Wo_h = Wq_h^T @ (Wk_kv(h) @ Wv_kv(h)^T)``, ``d x d_h``; or
   (``variant="qkv_concat"``, the authors' released script, with GQA's ``kv(h)`` applied) the flattened
   ``Wq_h``, ``Wk_kv(h)``, ``Wv_kv(h)`` slices one after the other;
2. tempered softmax over all its entries, ``P_h = softmax(vec(W_h) / tau)``;
3. the distance between the base's and the task's ``P_h``: by default the Wasserstein-1 distance on the unit
   support ``x_i = i / (N - 1)``, exactly ``sum_i |CDF_B(i) - CDF_T(i)| / (N - 1)``, where the CDF gap is the
   float64 cumulative sum of ``P_B - P_T``.

How it is fast and small: the unit of work is one KV group of one layer. Its q/k/v rows are viewed in the
checkpoint's memory map (no copy) and their pages released when the unit is done, and each head's matrix is built and reduced in blocks that stay in the CPU
cache, in float64 buffers that are reused too (no fresh pages are faulted in, and memory does not grow with the
model). Units run on ``torch.get_num_threads()`` worker threads; every torch call inside runs single-threaded
and the blocks depend only on the geometry, so the scores are bitwise the same for any thread count.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch

from peft_alps.localization.sources.adapted_weights import reads_frozen_base
from peft_alps.localization.sources.base import AttentionSource
from peft_alps.localization.sources.open import open_source
from peft_alps.localization.sources.hub_transfer import bytes_read, format_bytes
from peft_alps.layouts import HeadDims, head_parts
from peft_alps.scores import HeadScores
from peft_alps.threads import torch_threads

Metric = Literal["wasserstein", "kl", "js", "cosine", "euclidean"]
Variant = Literal["qkv_product", "qkv_concat"]
METRICS: tuple[str, ...] = ("wasserstein", "kl", "js", "cosine", "euclidean")
VARIANTS: tuple[str, ...] = ("qkv_product", "qkv_concat")

# A head's flattened matrix is processed in blocks of at most this many entries (whole rows of a qkv_product
# matrix; never across the q/k/v parts of qkv_concat): a block of both models (2 x 512 KiB of float64) stays in a
# core's L2 cache while it is converted, exponentiated, summed, differenced and scanned.
BLOCK_ENTRIES = 1 << 17

# Units run on several threads only when a layer has at least this many q/k/v weights: below it, the threads'
# page faults and hand-offs cost more than they save (measured: 8 layers x 1.5M weights ran no faster on two
# threads; 16 layers x 6.3M ran 1.4-1.5x faster).
PARALLEL_MIN_LAYER_WEIGHTS = 4_000_000


# ------------------------------------------------------------------------------------------ deterministic math


def _single_thread():
    """Reductions and matrix products give bitwise different sums with different thread counts; run every torch
    call on one thread so that scores never depend on ``torch.get_num_threads()``."""
    return torch_threads(1)


class _Workspace(threading.local):
    """Float64 buffers of one worker thread, grown on demand and reused for every head."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[slot] = torch.empty(numel, dtype=torch.float64)
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()

Fill = Callable[[int, int, torch.Tensor], torch.Tensor]  # fill(start, stop, out): entries [start, stop) of a row


def _shifted(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``(x - max) / tau`` row-wise, in place (the max is exact in any order)."""
    x.sub_(x.amax(dim=-1, keepdim=True))
    if tau != 1.0:
        x.div_(tau)
    return x


def _log_softmax_(x: torch.Tensor, tau: float) -> torch.Tensor:
    x = _shifted(x, tau)
    return x.sub_(torch.log(torch.exp(x).sum(dim=-1, keepdim=True)))


# exp(x / tau) is used without the max shift while the row's sum lands here: no entry overflowed, and an entry
# that underflowed to 0 had probability below exp(-708), far under float64's resolution of the row's mass.
_SAFE_EXP_SUM = (1.0, 1e300)


def _exp_row(fill: Fill, blocks: list[tuple[int, int]], out: torch.Tensor, tau: float) -> float:
    """``out = exp(x / tau)`` for the row ``x`` that ``fill`` writes block by block; returns ``sum(out)`` (softmax is
    ``out / sum``). Shift-free (one pass fewer); if the sum leaves :data:`_SAFE_EXP_SUM` (overflow, or every entry
    tiny), the row is written again and shifted by its max first."""

    def exp_sum(shift: float = 0.0) -> float:
        total = 0.0
        for start, stop in blocks:
            block = fill(start, stop, out[start:stop])
            if shift:
                block.sub_(shift)
            if tau != 1.0:
                block.div_(tau)
            total += float(block.exp_().sum())
        return total

    total = exp_sum()
    if _SAFE_EXP_SUM[0] <= total <= _SAFE_EXP_SUM[1]:
        return total
    return exp_sum(shift=max(float(fill(start, stop, out[start:stop]).amax()) for start, stop in blocks))


def wasserstein_row(fill_b: Fill, fill_t: Fill, blocks: list[tuple[int, int]], tau: float) -> float:
    """W1 between ``softmax(x_b / tau)`` and ``softmax(x_t / tau)`` on the support ``i / (N - 1)``, for the rows
    that ``fill_b`` / ``fill_t`` write block by block.

    Exactly ``sum_{i < N-1} |CDF_B(i) - CDF_T(i)| / (N - 1)`` (the last gap is 0 by definition). With ``e = exp``
    and ``s`` its sum, ``CDF_B - CDF_T = cumsum(e_B - (s_B / s_T) e_T) / s_B``: one float64 cumulative sum of the
    difference, carried from block to block (bitwise the same as over the whole row; no cancellation between
    two CDFs near 1, no normalizing passes). Identical rows give exactly 0 (the ratio is then exactly 1)."""
    n = blocks[-1][1]
    if n < 2:
        return 0.0
    e_b, e_t = _WORKSPACE.get("base", (n,)), _WORKSPACE.get("task", (n,))
    s_b = _exp_row(fill_b, blocks, e_b, tau)
    ratio = s_b / _exp_row(fill_t, blocks, e_t, tau)
    carry = total = 0.0
    for start, stop in blocks:
        gap = e_b[start:stop].sub_(e_t[start:stop], alpha=ratio)
        if carry:
            gap[:1].add_(carry)
        gap.cumsum_(dim=0)
        if stop < n:
            carry = float(gap[-1])
        total += float(torch.linalg.vector_norm(gap if stop < n else gap[:-1], ord=1))
    return total / (s_b * (n - 1))


def _distance(fill_b: Fill, fill_t: Fill, blocks: list[tuple[int, int]], metric: str, tau: float) -> float:
    """Distance between ``softmax(x_b / tau)`` and ``softmax(x_t / tau)`` for the rows that ``fill_b`` /
    ``fill_t`` write block by block."""
    if metric == "wasserstein":
        return wasserstein_row(fill_b, fill_t, blocks, tau)
    n = blocks[-1][1]
    rows = []
    for fill, slot in ((fill_b, "base"), (fill_t, "task")):
        row = _WORKSPACE.get(slot, (1, n))
        for start, stop in blocks:
            fill(start, stop, row[0, start:stop])
        rows.append(row)
    logp_b, logp_t = _log_softmax_(rows[0], tau), _log_softmax_(rows[1], tau)
    p_b, p_t = torch.exp(logp_b), torch.exp(logp_t)
    if metric == "kl":
        out = (p_b * (logp_b - logp_t)).sum(dim=-1)
    elif metric == "js":
        log_m = torch.logaddexp(logp_b, logp_t) - math.log(2.0)
        out = 0.5 * (p_b * (logp_b - log_m)).sum(dim=-1) + 0.5 * (p_t * (logp_t - log_m)).sum(dim=-1)
    elif metric == "cosine":
        dot = (p_b * p_t).sum(dim=-1)
        out = 1.0 - dot / torch.sqrt((p_b * p_b).sum(dim=-1) * (p_t * p_t).sum(dim=-1))
    elif metric == "euclidean":
        out = torch.linalg.vector_norm(p_b - p_t, dim=-1)
    else:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return float(out[0])


# ------------------------------------------------------------------------------------------ per-head matrices


class HeadGroup:
    """The q/k/v slices of the query heads that share one KV group of one layer, in ``[out, in]`` orientation and
    the stored dtype: ``q`` ``[group_size, head_dim, hidden]``, ``k`` and ``v`` ``[1, head_dim, hidden]``.

    Only these rows are read (views of the checkpoint's memory map where it has one), located through
    :func:`peft_alps.layouts.head_parts`, so fused and transposed projections of any registered family work.
    """

    def __init__(self, source: AttentionSource, layer: int, group: int, model: str):
        dims = self.dims = source.dims
        first = group * dims.group_size
        self.heads = range(first, first + dims.group_size)
        where = f"layer {layer} of {model} {source.name!r}"
        pieces: dict[str, torch.Tensor] = {}
        for proj in source.projections:
            shape, expected_rows = source.shape(layer, proj), _expected_rows(proj.role, dims)
            if len(shape) != 2 or shape[0] != expected_rows:
                raise ValueError(
                    f"{where}: {proj.path} weight has shape {list(shape)} in [out, in] orientation, expected "
                    f"{expected_rows} output rows for {dims.num_heads} heads / {dims.num_kv_heads} KV heads of "
                    f"head_dim {dims.head_dim}"
                )
            for part, rows in _group_rows(proj.role, dims, group).items():
                pieces[part] = source.rows(layer, proj, rows).reshape(-1, dims.head_dim, shape[1])
        missing = [part for part in ("q", "k", "v") if part not in pieces]
        if missing:
            raise ValueError(f"{where}: no projection provides the {'/'.join(missing)} weights of the heads")
        self.q, self.k, self.v = pieces["q"], pieces["k"], pieces["v"]
        self._kv: torch.Tensor | None = None

    @property
    def hidden(self) -> int:
        return self.q.shape[-1]

    def prepare(self, variant: str) -> None:
        """Work shared by the group's heads (once, before they are scored): ``Wk_g @ Wv_g^T``, ``[d_h, d_h]``."""
        if variant == "qkv_product" and self._kv is None:
            with _single_thread():
                k64 = _WORKSPACE.get("k64", tuple(self.k.shape[1:])).copy_(self.k[0])  # float64, reused buffers
                v64 = _WORKSPACE.get("v64", tuple(self.v.shape[1:])).copy_(self.v[0])
                self._kv = k64 @ v64.t()

    def blocks(self, variant: str) -> list[tuple[int, int]]:
        """``(start, stop)`` of the blocks of a head's flattened matrix (see :data:`BLOCK_ENTRIES`)."""
        d, d_h = self.hidden, self.dims.head_dim
        if variant == "qkv_product":  # whole rows of the d x d_h matrix
            rows = max(1, BLOCK_ENTRIES // d_h)
            return [(r * d_h, min(d, r + rows) * d_h) for r in range(0, d, rows)]
        if variant == "qkv_concat":  # the q, k and v slices, each split alone
            part = d_h * d
            return [(p * part + o, p * part + min(part, o + BLOCK_ENTRIES))
                    for p in range(3) for o in range(0, part, BLOCK_ENTRIES)]
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")

    def filler(self, variant: str, index: int) -> Fill:
        """``fill(start, stop, out)``: writes entries ``[start, stop)`` of the flattened matrix (row-major) of the
        group's ``index``-th head into the float64 ``out`` and returns it. Only for the blocks of :meth:`blocks`."""
        d_h = self.dims.head_dim
        if variant == "qkv_product":
            if self._kv is None:
                raise RuntimeError("HeadGroup.prepare('qkv_product') must run before the heads are scored")
            q, kv = self.q[index], self._kv  # [d_h, d], [d_h, d_h]

            def fill(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
                r0, r1 = start // d_h, stop // d_h  # rows r0..r1 of Wq_h^T @ kv: columns of q
                q64 = _WORKSPACE.get("q64", (d_h, r1 - r0)).copy_(q[:, r0:r1])
                torch.mm(q64.t(), kv, out=out.view(r1 - r0, d_h))
                return out

            return fill
        parts = (self.q[index].reshape(-1), self.k[0].reshape(-1), self.v[0].reshape(-1))
        size = d_h * self.hidden

        def fill(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
            part, offset = divmod(start, size)
            return out.copy_(parts[part][offset : offset + stop - start])  # the copy converts to float64

        return fill


@functools.lru_cache(maxsize=1024)
def _group_rows(role: str, dims: HeadDims, group: int) -> dict[str, list[int]]:
    """Output rows of a projection of ``role`` that hold KV group ``group``'s q (all its query heads), k and v
    (once) pieces: ``{part: rows}``, from :func:`peft_alps.layouts.head_parts` (the same for every layer)."""
    heads = range(group * dims.group_size, (group + 1) * dims.group_size)
    out = {}
    for part in head_parts(role, dims, heads[0]):
        if part != "o":
            owners = heads if part == "q" else heads[:1]  # k/v: the group's own rows, once
            out[part] = [row for h in owners for row in head_parts(role, dims, h)[part][1]]
    return out


def _expected_rows(role: str, dims: HeadDims) -> int:
    n, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    return {"q": n * d, "k": g * d, "v": g * d, "qkv": (n + 2 * g) * d, "qkv_grouped": (n + 2 * g) * d}[role]


def score_group(base: HeadGroup, task: HeadGroup, metric: str = "wasserstein", variant: str = "qkv_product",
                tau: float = 1.0) -> np.ndarray:
    """PAD scores (float64, ``[group_size]``) of one KV group's query heads from the base's and the task's slices."""
    with _single_thread():
        if variant == "qkv_concat" and metric == "wasserstein" and len(base.heads) > 1:
            shared = _concat_w1_shared_kv(base, task, tau)
            if shared is not None:
                return shared
        base.prepare(variant)
        task.prepare(variant)
        blocks = base.blocks(variant)
        return np.array([
            _distance(base.filler(variant, i), task.filler(variant, i), blocks, metric, tau)
            for i in range(len(base.heads))
        ], dtype=np.float64)


def _concat_w1_shared_kv(base: HeadGroup, task: HeadGroup, tau: float) -> np.ndarray | None:
    """W1 of every ``qkv_concat`` head of a KV group, with the group's k and v slices (two thirds of each head's
    row, the same for all its heads) exponentiated and cumulatively summed once per model instead of per head.

    For head ``h`` with ``e = exp(x / tau)``, sums ``s = s_q(h) + s_k + s_v`` and ``r = s_B / s_T``, the CDF gap
    scaled by ``s_B`` is ``cumsum(e_B - r e_T)`` over the q slice, then ``carry + C_B - r C_T`` over the k and the
    v slice, where ``C`` is the group's cumulative sum of that slice. Identical heads still give exactly 0 (then
    ``r`` is exactly 1). Returns None when an unshifted ``exp`` is not safe (see :data:`_SAFE_EXP_SUM`); the
    caller then scores head by head."""
    size = base.dims.head_dim * base.hidden  # entries per slice
    n = 3 * size
    cumulative, kv_sums = [], []
    for model, heads in (("base", base), ("task", task)):
        c = _WORKSPACE.get(f"{model}:kv-cumsum", (2, size))
        c[0].copy_(heads.k[0].reshape(-1))
        c[1].copy_(heads.v[0].reshape(-1))
        if tau != 1.0:
            c.div_(tau)
        c.exp_().cumsum_(dim=1)
        cumulative.append(c)
        kv_sums.append(float(c[0, -1]) + float(c[1, -1]))
    gap_kv = _WORKSPACE.get("kv-gap", (size,))
    out = np.empty(len(base.heads), dtype=np.float64)
    for i in range(len(base.heads)):
        sums, rows = [], []
        for model, heads, kv_sum in (("base", base, kv_sums[0]), ("task", task, kv_sums[1])):
            e = _WORKSPACE.get(model, (size,)).copy_(heads.q[i].reshape(-1))
            if tau != 1.0:
                e.div_(tau)
            total = float(e.exp_().sum()) + kv_sum
            if not _SAFE_EXP_SUM[0] <= total <= _SAFE_EXP_SUM[1]:
                return None
            sums.append(total)
            rows.append(e)
        ratio = sums[0] / sums[1]
        gap = rows[0].sub_(rows[1], alpha=ratio).cumsum_(dim=0)
        carry, total = float(gap[-1]), float(torch.linalg.vector_norm(gap, ord=1))
        for part in (0, 1):
            gap = torch.sub(cumulative[0][part], cumulative[1][part], alpha=ratio, out=gap_kv)
            if carry:
                gap.add_(carry)
            total += float(torch.linalg.vector_norm(gap if part == 0 else gap[:-1], ord=1))
            carry = float(gap[-1])
        out[i] = total / (sums[0] * (n - 1))
    return out


@contextlib.contextmanager
def _parallel_map(workers: int):
    """``map`` on ``workers`` threads (plain ``map`` for one), with torch single-threaded meanwhile (restored
    after); pending items are dropped if one fails."""
    with _single_thread():
        if workers <= 1:
            yield map
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="peft-alps-localize")
        try:
            yield pool.map
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


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


def warn_all_zero(base: str, task: str) -> None:
    warnings.warn(
        f"every head scored exactly 0: base {base!r} and task {task!r} have identical q/k/v weights, so top_k would "
        "pick heads by index order, not by the task. Pass the fine-tuned task model (a PEFT task model is read with "
        "its active adapters; check that they are active and trained).",
        stacklevel=3,
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
            tensors), a Hugging Face Hub repo id (only the q/k/v byte ranges are read, into a per-commit cache
            beside the Hub cache; works offline from the caches) or an in-memory transformers model. Both must have
            the same attention geometry. An in-memory PEFT model (e.g. an unmerged LoRA or ALPS task model) is read with its
            active adapters' deltas added, one projection at a time, as ``merge_and_unload()`` would leave it (the
            model is not changed); if ``task = get_peft_model(base, ...)`` wrapped ``base`` in place, ``base`` is read
            without adapters. Adapters that are no additive delta (DoRA, IA3, ...) are refused.
        metric: ``"wasserstein"`` (PAD, default), ``"kl"`` (KL(P_B || P_T)), ``"js"``, ``"cosine"`` (1 - cosine
            similarity of the distributions) or ``"euclidean"``.
        variant: ``"qkv_product"`` (the paper's ``Wq_h^T Wk Wv^T``, default) or ``"qkv_concat"`` (flattened
            q/k/v slices, as in the authors' released script, with the right KV group under GQA).
        tau: softmax temperature (> 0).
        progress: show a tqdm bar over layers, with the bytes read from the Hub (or pass a tqdm-like wrapper).
        revision, task_revision: Hub revisions of the base and the task repo.

    Returns:
        :class:`HeadScores` with ``scores`` a float64 numpy array ``[num_layers, num_heads]``; higher means more
        task-specific. Pass it (or its saved JSON) to ``AlpsConfig(head_scores=..., ratio=0.1)``.
    """
    _check_args(metric, variant, tau)
    tau = float(tau)
    frozen_base = reads_frozen_base(base, task)  # task = get_peft_model(base, ...) wraps base's own modules
    with open_source(base, revision=revision, frozen=frozen_base) as base_src, \
            open_source(task, revision=task_revision) as task_src:
        check_same_geometry(base_src, task_src)
        dims = base_src.dims
        layers = range(dims.num_layers)
        hub = any(getattr(src, "transfer", None) is not None for src in (base_src, task_src))
        if progress:
            from tqdm.auto import tqdm

            wrap = progress if callable(progress) else tqdm
            layers = wrap(layers, desc="scoring heads", unit="layer")
        def score(unit: tuple[int, int]) -> np.ndarray:  # one KV group of one layer, on one thread
            layer, group = unit
            try:
                heads_b = HeadGroup(base_src, layer, group, "base")
                heads_t = HeadGroup(task_src, layer, group, "task")
                if heads_b.hidden != heads_t.hidden:
                    raise ValueError(
                        f"base {base_src.name!r} and task {task_src.name!r} differ in hidden size "
                        f"({heads_b.hidden} vs {heads_t.hidden}); ALPS compares models of the same architecture"
                    )
                return score_group(heads_b, heads_t, metric, variant, tau)
            finally:
                base_src.release()
                task_src.release()

        scores = np.empty((dims.num_layers, dims.num_heads), dtype=np.float64)
        units = [(layer, group) for layer in range(dims.num_layers) for group in range(dims.num_kv_heads)]
        layer_weights = sum(math.prod(base_src.shape(0, proj)) for proj in base_src.projections)
        workers = torch.get_num_threads() if layer_weights >= PARALLEL_MIN_LAYER_WEIGHTS else 1
        with _parallel_map(workers) as parallel_map:
            results = parallel_map(score, units)
            for layer in layers:
                scores[layer] = np.concatenate([next(results) for _ in range(dims.num_kv_heads)])
                if hub and hasattr(layers, "set_postfix_str"):  # Hub repos: the bytes read so far
                    layers.set_postfix_str(f"{format_bytes(bytes_read(base_src, task_src))} of q/k/v read", refresh=False)
        if not scores.any():
            warn_all_zero(base_src.name, task_src.name)
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
