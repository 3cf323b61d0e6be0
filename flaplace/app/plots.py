"""Pictures of a run: the reliability diagram comparing MAP and Laplace predictions."""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from flaplace.metrics import as_class_probs, ece


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the reliability diagram needs matplotlib: pip install matplotlib (or 'flaplace[demo]')"
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def reliability_bins(
    probs: Float[Tensor, "batch classes"], labels: Shaped[Tensor, " batch"], n_bins: int = 15
) -> tuple[Tensor, Tensor, Tensor]:
    """Per equal-width bin of top-class confidence: ``(mean confidence, accuracy, count)``.

    Bins follow [`flaplace.metrics.ece`][flaplace.metrics.ece] (``((m-1)/M, m/M]``); empty bins hold NaN.

    Examples:
        >>> confidence, accuracy, count = reliability_bins(probs, labels)
    """
    p, y = as_class_probs(probs, labels)
    confidence, prediction = p.max(dim=1)
    correct = (prediction == y).double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, confidence)
    correct_sum = torch.zeros_like(count).index_add_(0, bins, correct)
    safe = count.clamp(min=1)
    nan = torch.full_like(count, float("nan"))
    has = count > 0
    return torch.where(has, conf_sum / safe, nan), torch.where(has, correct_sum / safe, nan), count


def reliability_diagram(
    probs_by_method: Mapping[str, Tensor],
    labels: Tensor,
    path: str | PathLike[str],
    *,
    n_bins: int = 15,
    title: str = "",
) -> None:
    """Write a PNG reliability diagram with one panel per method (accuracy vs confidence per bin).

    Each panel shows the per-bin accuracy as bars, the diagonal of perfect calibration,
    the gap to the mean confidence, and the ECE in its title; a bottom row shows how
    many examples fall in each bin.

    Raises:
        ImportError: matplotlib is not installed (with the command that installs it).

    Examples:
        >>> reliability_diagram({"MAP": map_probs, "Laplace": la_probs}, labels, "reliability.png")
    """
    if not probs_by_method:
        raise ValueError("reliability_diagram needs at least one method")
    plt = _pyplot()
    n = len(probs_by_method)
    fig, axes = plt.subplots(
        2, n, figsize=(4.2 * n, 5.4), gridspec_kw={"height_ratios": [3, 1]}, squeeze=False
    )
    edges = torch.linspace(0, 1, n_bins + 1)
    centres = ((edges[:-1] + edges[1:]) / 2).numpy()
    width = 1 / n_bins
    binned = {method: reliability_bins(probs, labels, n_bins) for method, probs in probs_by_method.items()}
    most = max(float(count.max()) for _, _, count in binned.values())
    for column, (method, probs) in enumerate(probs_by_method.items()):
        confidence, accuracy, count = binned[method]
        top, bottom = axes[0, column], axes[1, column]
        acc = torch.nan_to_num(accuracy).numpy()
        conf = torch.nan_to_num(confidence).numpy()
        filled = (count > 0).numpy()
        top.bar(
            centres[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy"
        )
        top.bar(
            centres[filled],
            (conf - acc)[filled],
            bottom=acc[filled],
            width=width,
            color="tab:red",
            alpha=0.3,
            hatch="//",
            label="gap to confidence",
        )
        top.plot([0, 1], [0, 1], "k--", linewidth=1)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{method}  (ECE {ece(probs, labels, n_bins):.3f})")
        top.set_ylabel("accuracy")
        top.legend(loc="upper left", fontsize=10, framealpha=0.9)
        bottom.bar(centres, count.numpy(), width=width, color="grey", edgecolor="black")
        bottom.set_xlim(0, 1)
        bottom.set_ylim(0, 1.05 * most)  # one scale for every method's counts
        bottom.set_xlabel("confidence (top class)")
        bottom.set_ylabel("examples")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110, format="png")
    plt.close(fig)
