"""``HeadScores``: one score per attention head, the selections built from them, and their JSON file.

A ``HeadScores`` is the plain result of :func:`peft_alps.localize_heads`: a float64 numpy array
``scores[layer, head]`` (query-head indices) plus what produced it. It selects heads for ``AlpsConfig``:

* :meth:`HeadScores.top_k` - the paper's selection: the ``K`` highest-scoring heads over all layers, with
  ``K = ceil(ratio * total_heads)`` or ``K = k``;
* :meth:`HeadScores.random` and :meth:`HeadScores.layer_consistent` - the paper's baselines (``K`` random
  heads; random heads with the same count ``ceil(K / num_layers)`` in every layer), seeded.

Every selection is ``{layer: [heads]}`` with sorted int keys and sorted heads, which is what
``AlpsConfig(target_heads=...)`` takes.
"""

from __future__ import annotations

import json
import math
import os
import random as _random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
FORMAT = "peft-alps-head-scores"

Selection = dict[int, list[int]]


def num_selected(total: int, ratio: float | None = None, k: int | None = None) -> int:
    """``K`` for a retention ratio (``ceil(ratio * total)``) or an explicit ``k``, validated.

    ``ratio * total`` is rounded to 9 decimals before the ceiling so that e.g. ``0.1 * 30`` gives 3, not 4.
    """
    if (ratio is None) == (k is None):
        raise ValueError(f"pass exactly one of ratio= (0 < ratio <= 1) or k= (1..{total} heads), got ratio={ratio!r}, k={k!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
            raise ValueError(f"ratio {ratio!r} out of range: expected 0 < ratio <= 1 (the fraction of heads to train, e.g. 0.1)")
        return max(1, math.ceil(round(ratio * total, 9)))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer number of heads, got {k!r}")
    if not 1 <= k <= total:
        raise ValueError(f"k={k} out of range: the model has {total} heads, so 1 <= k <= {total}")
    return int(k)


def _as_selection(pairs) -> Selection:
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(int(layer), []).append(int(head))
    return {layer: sorted(heads) for layer, heads in sorted(out.items())}


def select_random(num_layers: int, num_heads: int, *, ratio: float | None = None, k: int | None = None,
                  seed: int = 0) -> Selection:
    """``K`` heads drawn uniformly at random without replacement (the paper's *Random* baseline)."""
    total = num_layers * num_heads
    count = num_selected(total, ratio, k)
    picks = _random.Random(seed).sample(range(total), count)
    return _as_selection(divmod(i, num_heads) for i in picks)


def select_layer_consistent(num_layers: int, num_heads: int, *, ratio: float | None = None, k: int | None = None,
                            seed: int = 0) -> Selection:
    """Random heads, the same number ``ceil(K / num_layers)`` in every layer (the paper's *LC* baseline)."""
    per_layer = math.ceil(num_selected(num_layers * num_heads, ratio, k) / num_layers)
    rng = _random.Random(seed)
    return {layer: sorted(rng.sample(range(num_heads), per_layer)) for layer in range(num_layers)}


@dataclass
class HeadScores:
    """Per-head localization scores of a base/task pair.

    Attributes:
        scores: float64 numpy array ``[num_layers, num_heads]`` (query heads); higher = more task-specific.
        metric, variant, tau: how the scores were computed (see :func:`peft_alps.localize_heads`).
        base, task: identifiers of the two models (folder, repo id or model name).
        model_type: transformers ``model_type`` of the pair.
        head_dims: ``{"num_layers", "num_heads", "num_kv_heads", "head_dim"}``.
    """

    scores: np.ndarray
    metric: str = "wasserstein"
    variant: str = "qkv_product"
    tau: float = 1.0
    base: str | None = None
    task: str | None = None
    model_type: str | None = None
    head_dims: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        scores = np.asarray(self.scores, dtype=np.float64)
        if scores.ndim != 2 or 0 in scores.shape:
            raise ValueError(f"scores must be a non-empty [num_layers, num_heads] array, got shape {list(scores.shape)}")
        if not np.isfinite(scores).all():
            layer, head = map(int, np.argwhere(~np.isfinite(scores))[0])
            raise ValueError(f"score of head {head} in layer {layer} is {scores[layer, head]}; scores must be finite")
        self.scores = scores
        expected = {"num_layers": scores.shape[0], "num_heads": scores.shape[1]}
        for key, value in expected.items():
            if key in self.head_dims and self.head_dims[key] != value:
                raise ValueError(f"head_dims[{key!r}] = {self.head_dims[key]} does not match the scores' shape {list(scores.shape)}")

    # ---------------------------------------------------------------------------------------- inspection

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores.shape)

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_heads(self) -> int:
        return self.scores.shape[1]

    @property
    def total_heads(self) -> int:
        return self.scores.size

    def ranking(self) -> list[tuple[int, int]]:
        """All ``(layer, head)`` pairs, highest score first; ties go to the lower layer, then the lower head."""
        flat = self.scores.ravel()
        order = np.lexsort((np.arange(flat.size), -flat))
        return [divmod(int(i), self.num_heads) for i in order]

    def __repr__(self) -> str:
        top = ", ".join(f"L{layer}H{head}" for layer, head in self.ranking()[:5])
        return (f"HeadScores({self.num_layers} layers x {self.num_heads} heads, metric={self.metric!r}, "
                f"variant={self.variant!r}, tau={self.tau}, top: {top})")

    # ---------------------------------------------------------------------------------------- selection

    def top_k(self, ratio: float | None = None, *, k: int | None = None) -> Selection:
        """The ``K`` highest-scoring heads over all layers: ``K = ceil(ratio * total_heads)`` or ``k``."""
        count = num_selected(self.total_heads, ratio, k)
        return _as_selection(self.ranking()[:count])

    def random(self, ratio: float | None = None, *, k: int | None = None, seed: int = 0) -> Selection:
        """As many heads as :meth:`top_k`, drawn at random (baseline)."""
        return select_random(self.num_layers, self.num_heads, ratio=ratio, k=k, seed=seed)

    def layer_consistent(self, ratio: float | None = None, *, k: int | None = None, seed: int = 0) -> Selection:
        """Random heads with the same count in every layer (baseline)."""
        return select_layer_consistent(self.num_layers, self.num_heads, ratio=ratio, k=k, seed=seed)

    # ---------------------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "base": self.base,
            "task": self.task,
            "model_type": self.model_type,
            "head_dims": dict(self.head_dims),
            "metric": self.metric,
            "variant": self.variant,
            "tau": self.tau,
            "shape": list(self.shape),
            "scores": self.scores.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "head scores") -> HeadScores:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a peft-alps head-scores file (format is {data.get('format')!r}, expected {FORMAT!r})")
        version = data.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{source}: schema_version must be a positive integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{source}: schema_version {version} is newer than this peft-alps understands (up to "
                f"{SCHEMA_VERSION}); upgrade peft-alps to read it"
            )
        missing = [key for key in ("metric", "variant", "tau", "shape", "scores") if key not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        try:
            scores = np.asarray(data["scores"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: 'scores' must be a list of rows of numbers ({err})") from None
        if list(scores.shape) != list(data["shape"]):
            raise ValueError(f"{source}: 'scores' has shape {list(scores.shape)} but 'shape' says {data['shape']}")
        try:
            return cls(
                scores=scores,
                metric=data["metric"],
                variant=data["variant"],
                tau=float(data["tau"]),
                base=data.get("base"),
                task=data.get("task"),
                model_type=data.get("model_type"),
                head_dims=dict(data.get("head_dims") or {}),
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores as JSON (exact float round-trip). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadScores:
        """Read a file written by :meth:`save`; malformed files raise ``ValueError`` naming the problem."""
        path = Path(path)
        if not path.is_file():
            raise OSError(f"head-scores file {str(path)!r} does not exist (write one with peft-alps localize ... --output)")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"head-scores file {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data, source=f"head-scores file {str(path)!r}")

    # ---------------------------------------------------------------------------------------- plot

    def heatmap(self, path: str | os.PathLike, selected: Selection | None = None, *, ratio: float | None = 0.1,
                k: int | None = None, title: str | None = None) -> Path:
        """Save a PNG heatmap of layers x heads; the selected heads (``top_k(ratio / k)`` unless ``selected`` is
        given) are outlined."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        if selected is None:
            selected = self.top_k(k=k) if k is not None else self.top_k(ratio)
        layers, heads = self.shape
        fig = Figure(figsize=(min(16, 3 + 0.35 * heads), min(12, 2 + 0.3 * layers)), dpi=100)
        FigureCanvasAgg(fig)  # the Agg canvas, without pyplot or any global backend switch
        ax = fig.subplots()
        image = ax.imshow(self.scores, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=f"{self.metric} score")
        for layer, layer_heads in selected.items():
            for head in layer_heads:
                ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5,
                                       clip_on=False))
        ax.set_xticks(range(0, heads, max(1, math.ceil(heads / 32))))
        ax.set_yticks(range(0, layers, max(1, math.ceil(layers / 40))))
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        count = sum(len(h) for h in selected.values())
        ax.set_title(title or f"ALPS head scores ({self.metric}, {self.variant})\n{count} selected heads outlined",
                     fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path


# ------------------------------------------------------------------------------------------------ agreement


def _average_ranks(values) -> Any:
    import numpy as np

    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    return sums[inverse] / counts[inverse]  # tied values share their mean rank


def head_overlap(scores_a: Any, scores_b: Any, ratio: float = 0.1) -> dict[str, Any]:
    """How well two head rankings agree: the top-``ratio`` sets (size, shared heads, Jaccard index) and the
    Spearman rank correlation of all scores. ``scores_a`` / ``scores_b`` are :class:`peft_alps.HeadScores` of the
    same model (e.g. from a full task model and from a warm-up)."""
    import numpy as np

    if tuple(scores_a.scores.shape) != tuple(scores_b.scores.shape):
        raise ValueError(f"head scores of different shapes: {scores_a.scores.shape} vs {scores_b.scores.shape}")
    top_a = {(layer, head) for layer, heads in scores_a.top_k(ratio).items() for head in heads}
    top_b = {(layer, head) for layer, heads in scores_b.top_k(ratio).items() for head in heads}
    ra, rb = _average_ranks(scores_a.scores), _average_ranks(scores_b.scores)
    spearman = float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else float("nan")
    return {
        "ratio": ratio,
        "k": len(top_a),
        "shared": len(top_a & top_b),
        "jaccard": len(top_a & top_b) / len(top_a | top_b),
        "spearman": spearman,
    }
