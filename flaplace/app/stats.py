"""Paired bootstrap intervals for metric differences, by ``scipy.stats.bootstrap``.

The benchmarks (``benchmarks/peers_quality.py``, ``benchmarks/llm_quality.py``) call it in place
of the percentile loops they had; their committed results came from those loops, so a rerun's
intervals differ slightly (other random draws), while the point differences are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flaplace import metrics as _metrics

__all__ = ["paired_bootstrap"]

METRICS: tuple[str, ...] = ("nll", "ece", "accuracy", "brier")


def paired_bootstrap(
    probs_a: Tensor,
    probs_b: Tensor,
    labels: Tensor,
    *,
    metrics: Sequence[str] = METRICS,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> dict[str, dict[str, Any]]:
    """``metric(a) - metric(b)`` on the same examples, with a paired bootstrap interval.

    ``scipy.stats.bootstrap`` resamples the example INDICES with replacement; each resample scores
    ``a`` and ``b`` on the same rows, which makes the bootstrap paired.

    Args:
        probs_a: probabilities ``(N, C)`` of method a.
        probs_b: probabilities ``(N, C)`` of method b, for the same examples.
        labels: ``(N,)`` class indices.
        metrics: names of [`flaplace.metrics`][flaplace.metrics] functions.
        n_resamples: bootstrap resamples.
        confidence: the interval's confidence level.
        seed: the random seed of the resampling.
        method: scipy's interval method: ``"percentile"`` (default), ``"basic"`` or ``"BCa"``.

    Returns:
        ``{metric: {"diff": float, "ci95": [low, high]}}`` (the key says ``ci95`` whatever the
        level, as the benchmarks' JSON does).

    Examples:
        >>> paired_bootstrap(laplace_probs, map_probs, labels)["nll"]
        {'diff': -0.031, 'ci95': [-0.045, -0.018]}
    """
    from scipy.stats import bootstrap

    if probs_a.shape != probs_b.shape or probs_a.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs_a {tuple(probs_a.shape)}, probs_b {tuple(probs_b.shape)} and labels "
            f"{tuple(labels.shape)} must describe the same examples"
        )
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    index = np.arange(labels.shape[0])
    out: dict[str, dict[str, Any]] = {}
    for name in metrics:
        fn: Callable[[Tensor, Tensor], float] = getattr(_metrics, name)

        def difference(rows: np.ndarray, fn=fn) -> float:
            picked = torch.as_tensor(rows, dtype=torch.long)
            return fn(probs_a[picked], labels[picked]) - fn(probs_b[picked], labels[picked])

        result = bootstrap(
            (index,),
            difference,
            vectorized=False,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method=method,
            rng=np.random.default_rng(seed),
        )
        interval = result.confidence_interval
        out[name] = {"diff": difference(index), "ci95": [float(interval.low), float(interval.high)]}
    return out
