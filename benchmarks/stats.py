"""Significance for "do ALPS's heads beat random heads?": rank among draws, permutation p-value, bootstrap CI.

The unit of the claim is a *head set*: ALPS's one head set (trained at a few seeds) against head sets drawn at
random (one run each). Three numbers answer it, each one-sided in ALPS's favour (lower loss, higher exact match):

- ``rank_p``: ALPS's mean against the draws' values: how many draws it beats, and the exact permutation p-value
  of its rank, ``(1 + #draws at least as good) / (n + 1)``. With 10 draws the smallest p it can reach is 1/11.
- ``paired_permutation_p``: per test example, ALPS (mean over seeds) minus Random (mean over draws); sign-flip
  permutation test of the mean difference (scipy). It holds the head sets fixed and asks about the test examples.
- ``hierarchical_bootstrap``: a 95% CI of the same mean difference that resamples the draws, ALPS's seeds and the
  test examples together (paired), so the head-set spread is inside the interval.

``verdict`` turns them into one word with a rule fixed before any result was seen: "better" when the permutation
p is below 0.05 *and* the whole CI lies on ALPS's side of zero, "worse" when the same holds the other way round,
else "not distinguishable at this power".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ALPHA = 0.05


def rank_p(value: float, draws: Sequence[float], lower_is_better: bool) -> dict[str, float]:
    """How many ``draws`` ``value`` beats strictly (``beats``), and the rank's one-sided p-value."""
    vals = np.asarray(draws, dtype=np.float64)
    better = vals > value if lower_is_better else vals < value
    return {"beats": int(better.sum()), "n": int(vals.size), "p": float((1 + (~better).sum()) / (vals.size + 1))}


def paired_permutation_p(a: Sequence[float], b: Sequence[float], lower_is_better: bool, n_resamples: int = 9999,
                         seed: int = 0) -> float:
    """One-sided sign-flip permutation p-value that the mean of ``a - b`` favours ``a`` (paired per example)."""
    from scipy.stats import permutation_test

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.all(x == y):
        return 1.0
    res = permutation_test((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis), permutation_type="samples",
                           alternative="less" if lower_is_better else "greater", n_resamples=n_resamples,
                           random_state=seed, vectorized=True)
    return float(res.pvalue)


def hierarchical_bootstrap(a_runs: np.ndarray, b_runs: np.ndarray, n_resamples: int = 4000, seed: int = 0,
                           level: float = 0.95) -> dict[str, float]:
    """CI of mean_examples(mean_a_runs - mean_b_runs), resampling a's runs, b's runs and the examples (paired).

    ``a_runs``: [runs_a, examples]; ``b_runs``: [runs_b, examples] (the same examples in the same order)."""
    a, b = np.asarray(a_runs, dtype=np.float64), np.asarray(b_runs, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need [runs, examples] arrays over the same examples, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    n_ex = a.shape[1]
    stats = np.empty(n_resamples)
    for i in range(n_resamples):
        ra = a[rng.integers(0, a.shape[0], a.shape[0])].mean(0)
        rb = b[rng.integers(0, b.shape[0], b.shape[0])].mean(0)
        stats[i] = (ra - rb)[rng.integers(0, n_ex, n_ex)].mean()
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float((a.mean(0) - b.mean(0)).mean()), "lo": float(lo), "hi": float(hi)}


def verdict(p_better: float, p_worse: float, ci: dict[str, float], lower_is_better: bool) -> str:
    favour_lo, favour_hi = (ci["hi"] < 0, ci["lo"] > 0) if lower_is_better else (ci["lo"] > 0, ci["hi"] < 0)
    if p_better < ALPHA and favour_lo:
        return "better"
    if p_worse < ALPHA and favour_hi:
        return "worse"
    return "not distinguishable at this power"


def compare(a_runs: np.ndarray, b_runs: np.ndarray, lower_is_better: bool) -> dict[str, object]:
    """Everything the report says about head set A (runs = seeds) against head sets B (runs = draws)."""
    a, b = np.asarray(a_runs, dtype=np.float64), np.asarray(b_runs, dtype=np.float64)
    ma, mb = a.mean(0), b.mean(0)
    rank = rank_p(float(a.mean()), b.mean(1).tolist(), lower_is_better)
    p_better = paired_permutation_p(ma, mb, lower_is_better)
    p_worse = paired_permutation_p(ma, mb, not lower_is_better)
    ci = hierarchical_bootstrap(a, b)
    return {"rank": rank, "p": p_better, "p_worse": p_worse, "ci": ci,
            "verdict": verdict(p_better, p_worse, ci, lower_is_better)}
