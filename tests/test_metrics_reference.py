"""flaplace.metrics against torchmetrics, and the paired bootstrap (flaplace.app.stats) against a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from flaplace.app.stats import paired_bootstrap
from flaplace.metrics import accuracy, ece, nll

torchmetrics_cls = pytest.importorskip("torchmetrics.functional.classification")


def random_probs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


@pytest.mark.parametrize(("c", "n_bins"), [(2, 15), (4, 10), (5, 20)])
def test_ece_and_accuracy_equal_torchmetrics(c, n_bins):
    probs, labels = random_probs(500, c, seed=c)
    reference = torchmetrics_cls.multiclass_calibration_error(
        probs, labels, num_classes=c, n_bins=n_bins, norm="l1"
    )
    # torchmetrics accumulates in float32 (its result is off by ~1e-7); flaplace in float64
    assert ece(probs, labels, n_bins) == pytest.approx(float(reference), abs=1e-6)
    acc = torchmetrics_cls.multiclass_accuracy(probs, labels, num_classes=c, average="micro")
    assert accuracy(probs, labels) == pytest.approx(float(acc), abs=1e-6)


def test_ece_bins_are_right_closed_where_torchmetrics_are_left_closed():
    # a confidence exactly on a bin edge (0.6 = 9/15): flaplace puts it in (8/15, 9/15], as Guo et al.
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    ours = ece(probs, labels, 15)
    theirs = float(torchmetrics_cls.multiclass_calibration_error(probs, labels, num_classes=2, n_bins=15))
    assert ours == pytest.approx((0.6 + 0.1) / 2, abs=1e-12)  # each example alone in its bin
    assert theirs == pytest.approx(ours, abs=1e-6)  # equal here: the two bins do not merge either way


def test_paired_bootstrap_of_the_nll_matches_the_normal_interval():
    probs_a, labels = random_probs(400, 3, seed=1)
    probs_b = torch.softmax(probs_a.log() * 0.5, -1)  # a tempered copy: correlated with a
    result = paired_bootstrap(probs_a, probs_b, labels, metrics=["nll"], n_resamples=800)
    per_example = -probs_a.gather(1, labels[:, None]).log() + probs_b.gather(1, labels[:, None]).log()
    mean, sd = float(per_example.mean()), float(per_example.std())
    assert result["nll"]["diff"] == pytest.approx(nll(probs_a, labels) - nll(probs_b, labels), abs=1e-12)
    assert result["nll"]["diff"] == pytest.approx(mean, abs=1e-12)
    half = 1.96 * sd / math.sqrt(400)  # the NLL difference is a mean: the CLT interval
    low, high = result["nll"]["ci95"]
    assert low == pytest.approx(mean - half, abs=0.2 * half)
    assert high == pytest.approx(mean + half, abs=0.2 * half)


def test_paired_bootstrap_errors():
    probs, labels = random_probs(10, 2, seed=0)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(probs, probs[:5], labels)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(probs, probs, labels, metrics=["auc"])
