"""Classification metrics of predictive probabilities: accuracy, NLL, ECE, Brier.

All take ``probs`` of shape ``(B, C)`` (rows sum to one) and integer ``labels`` of
shape ``(B,)``. Binary probabilities may also be given for the positive class
alone, as ``(B,)`` or ``(B, 1)``: they are turned into ``(B, 2)`` columns
``[1 - p, p]`` first (so the Brier score is then ``2 (p - y)^2`` per example,
the two-class definition). Results are Python floats computed in float64.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

#: Largest allowed ``|sum_c p_c - 1|`` per row (half precision gets more slack).
ROW_SUM_TOL = 1e-3
ROW_SUM_TOL_HALF = 1e-2


def as_class_probs(
    probs: Float[Tensor, " batch *classes"], labels: Shaped[Tensor, " batch"]
) -> tuple[Float[Tensor, "batch c"], Tensor]:
    """Check and normalise inputs: ``(B, C)`` float64 probabilities and ``(B,)`` int64 labels.

    Raises:
        ValueError: wrong shapes, an empty batch, probabilities that are not finite,
            outside ``[0, 1]`` or whose rows do not sum to one, labels that are not
            integers in ``[0, C)``.

    Examples:
        >>> p, y = as_class_probs(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))  # p: (2, 2)
    """
    if probs.ndim == 2 and probs.shape[1] == 1:
        probs = probs[:, 0]
    if probs.ndim == 1:
        probs = torch.stack([1 - probs, probs], dim=1)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (batch, classes), (batch,) or (batch, 1); got {tuple(probs.shape)}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be (batch,) with batch = {probs.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("the batch is empty")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point, got {probs.dtype}")
    tol = ROW_SUM_TOL_HALF if torch.finfo(probs.dtype).bits <= 16 else ROW_SUM_TOL
    p = probs.to(torch.float64)
    if not bool(torch.isfinite(p).all()):
        raise ValueError("probs contain non-finite values")
    if bool((p < 0).any()) or bool((p > 1).any()):
        raise ValueError(f"probs must lie in [0, 1]; got values in [{float(p.min())}, {float(p.max())}]")
    worst = float((p.sum(dim=1) - 1).abs().max())
    if worst > tol:
        raise ValueError(f"each row of probs must sum to 1; the worst row is off by {worst:.3g}")
    if labels.dtype.is_complex or (labels.is_floating_point() and not bool((labels == labels.round()).all())):
        raise ValueError(f"labels must be integer class indices, got {labels.dtype} values")
    y = labels.to(device=p.device, dtype=torch.int64)
    n_classes = p.shape[1]
    if bool((y < 0).any()) or bool((y >= n_classes).any()):
        raise ValueError(
            f"labels must be in [0, {n_classes}); got values in [{int(y.min())}, {int(y.max())}]"
        )
    return p, y


def accuracy(probs: Float[Tensor, " batch *classes"], labels: Shaped[Tensor, " batch"]) -> float:
    """Fraction of examples whose most probable class (first one on ties) is the label.

    Examples:
        >>> accuracy(torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 0]))
        0.5
    """
    p, y = as_class_probs(probs, labels)
    return float((p.argmax(dim=1) == y).double().mean())


def nll(probs: Float[Tensor, " batch *classes"], labels: Shaped[Tensor, " batch"]) -> float:
    """Mean negative log predictive probability of the labels, ``-mean_n log p_n[y_n]``.

    Probabilities are clamped below at the smallest normal number of the input's
    dtype, so a zero probability gives a large finite value, not infinity.

    Examples:
        >>> nll(torch.tensor([[0.5, 0.5]]), torch.tensor([1]))  # log 2
        0.6931471805599453
    """
    p, y = as_class_probs(probs, labels)
    tiny = torch.finfo(probs.dtype).tiny
    picked = p.gather(1, y[:, None])[:, 0].clamp(min=tiny)
    return float(-picked.log().mean())


def ece(probs: Float[Tensor, " batch *classes"], labels: Shaped[Tensor, " batch"], n_bins: int = 15) -> float:
    """Expected calibration error on the top-class confidence (L1, equal-width bins).

    Bin ``m`` (1-based) holds the confidences in ``((m-1)/M, m/M]``;
    ``ECE = sum_m (|B_m| / N) |accuracy(B_m) - mean confidence(B_m)|``.

    Examples:
        >>> round(ece(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0])), 4)
        0.4
    """
    # Kept rather than torchmetrics' multiclass_calibration_error, which it equals on data without
    # ties at bin edges (tests/test_metrics_reference.py): this one takes binary (B,) inputs and
    # checks its inputs with one-line errors, accumulates in float64 (torchmetrics: float32, ~1e-7
    # off) and uses right-closed bins ((m-1)/M, m/M] as Guo et al. define them (torchmetrics':
    # left-closed), so a confidence of exactly 1 needs no special case.
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y = as_class_probs(probs, labels)
    confidence, prediction = p.max(dim=1)
    correct = (prediction == y).double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(
        0, bins, torch.ones_like(confidence)
    )
    conf_sum = torch.zeros_like(count).index_add_(0, bins, confidence)
    correct_sum = torch.zeros_like(count).index_add_(0, bins, correct)
    return float((conf_sum - correct_sum).abs().sum() / p.shape[0])


def brier(probs: Float[Tensor, " batch *classes"], labels: Shaped[Tensor, " batch"]) -> float:
    """Brier score: mean over examples of ``sum_c (p_c - 1[c = y])^2``.

    Examples:
        >>> brier(torch.tensor([[0.75, 0.25]]), torch.tensor([0]))  # 0.25^2 + 0.25^2
        0.125
    """
    p, y = as_class_probs(probs, labels)
    one_hot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float((p - one_hot).square().sum(dim=1).mean())


def classification_metrics(
    probs: Float[Tensor, " batch *classes"], labels: Shaped[Tensor, " batch"], n_bins: int = 15
) -> dict[str, float]:
    """All four metrics at once: ``{"accuracy", "nll", "ece", "brier"}``.

    Examples:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> {k: round(v, 4) for k, v in classification_metrics(probs, torch.tensor([0, 1])).items()}
        {'accuracy': 1.0, 'nll': 0.1643, 'ece': 0.15, 'brier': 0.05}
    """
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "brier": brier(probs, labels),
    }
