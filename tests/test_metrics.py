"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from flaplace.metrics import accuracy, brier, classification_metrics, ece, nll

DTYPE = torch.float64

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=DTYPE)
LABELS = torch.tensor([0, 2])


def test_accuracy_nll_brier_closed_forms():
    assert accuracy(PROBS, LABELS) == 0.5  # argmax 0 (right), 1 (wrong)
    assert nll(PROBS, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-14)
    # (0.3^2 + 0.2^2 + 0.1^2 = 0.14) and (0.1^2 + 0.6^2 + 0.7^2 = 0.86), mean 0.5
    assert brier(PROBS, LABELS) == pytest.approx(0.5, rel=1e-14)


def test_ece_hand_computed_15_bins():
    probs = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # conf 0.90, correct, bin (13/15, 14/15]
            [0.92, 0.04, 0.04],  # conf 0.92, wrong,   bin (13/15, 14/15]
            [0.50, 0.30, 0.20],  # conf 0.50, correct, bin (7/15, 8/15]
            [0.20, 0.45, 0.35],  # conf 0.45, wrong,   bin (6/15, 7/15]
            [0.19, 0.19, 0.62],  # conf 0.62, correct, bin (9/15, 10/15]
        ],
        dtype=DTYPE,
    )
    labels = torch.tensor([0, 1, 0, 2, 2])
    # bin 14: 2/5 |0.5 - 0.91| = 0.164; bin 8: 1/5 * 0.5; bin 7: 1/5 * 0.45; bin 10: 1/5 * 0.38
    want = 0.4 * 0.41 + 0.2 * 0.5 + 0.2 * 0.45 + 0.2 * 0.38
    assert want == pytest.approx(0.43)
    assert ece(probs, labels) == pytest.approx(want, rel=1e-12)
    # one bin holding everything gives |3/5 - mean conf| instead: the binning matters
    assert ece(probs, labels, n_bins=1) == pytest.approx(abs(0.6 - (0.9 + 0.92 + 0.5 + 0.45 + 0.62) / 5))


def test_ece_bins_are_closed_on_the_right():
    # binary probabilities of the positive class; confidences 0.75, 0.75, 0.8 with 4 bins:
    # 0.75 belongs to (0.5, 0.75], 0.8 to (0.75, 1]
    probs = torch.tensor([0.75, 0.25, 0.8], dtype=DTYPE)
    labels = torch.tensor([1, 1, 1])  # right, wrong, right
    want = (2 / 3) * abs(0.5 - 0.75) + (1 / 3) * abs(1 - 0.8)
    assert ece(probs, labels, n_bins=4) == pytest.approx(want, rel=1e-12)


def test_perfectly_calibrated_and_certain_predictions():
    probs = torch.eye(3, dtype=DTYPE)
    labels = torch.arange(3)
    assert classification_metrics(probs, labels) == {"accuracy": 1.0, "nll": 0.0, "ece": 0.0, "brier": 0.0}


def test_binary_shapes_are_equivalent():
    p = torch.tensor([0.9, 0.2, 0.6, 0.4], dtype=DTYPE)
    y = torch.tensor([1, 0, 0, 1])
    two = torch.stack([1 - p, p], dim=1)
    for shaped in (p, p[:, None]):
        assert classification_metrics(shaped, y) == pytest.approx(classification_metrics(two, y), rel=1e-14)
    # two-class Brier: 2 (p - y)^2 per example
    assert brier(p, y) == pytest.approx(2 * float(((p - y) ** 2).mean()), rel=1e-14)
    assert accuracy(p, y) == 0.5
    assert nll(p, y) == pytest.approx(-sum(math.log(q) for q in (0.9, 0.8, 0.4, 0.4)) / 4, rel=1e-12)


def test_nll_of_a_zero_probability_is_large_but_finite():
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    value = nll(probs, torch.tensor([1]))
    assert value == pytest.approx(-math.log(torch.finfo(torch.float32).tiny), rel=1e-6)


def test_labels_may_be_bool_or_integral_floats():
    p = torch.tensor([0.9, 0.2], dtype=DTYPE)
    assert accuracy(p, torch.tensor([True, False])) == 1.0
    assert accuracy(p, torch.tensor([1.0, 0.0])) == 1.0


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (torch.full((2, 3, 2), 0.5, dtype=DTYPE), torch.tensor([0, 1]), "must be"),
        (torch.zeros((0, 3), dtype=DTYPE), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.tensor([[0.5, math.nan]], dtype=DTYPE), torch.tensor([0]), "non-finite"),
        (torch.tensor([[1.2, -0.2]], dtype=DTYPE), torch.tensor([0]), r"\[0, 1\]"),
        (torch.tensor([[0.5, 0.3]], dtype=DTYPE), torch.tensor([0]), "sum to 1"),
        (torch.tensor([[0.5, 0.5]], dtype=DTYPE), torch.tensor([2]), r"labels must be in \[0, 2\)"),
        (torch.tensor([[0.5, 0.5]], dtype=DTYPE), torch.tensor([-1]), "labels must be in"),
        (torch.tensor([[0.5, 0.5]], dtype=DTYPE), torch.tensor([0.5], dtype=DTYPE), "integer class indices"),
        (torch.tensor([1.5], dtype=DTYPE), torch.tensor([1]), r"\[0, 1\]"),
    ],
)
@pytest.mark.parametrize("metric", [accuracy, nll, ece, brier, classification_metrics])
def test_bad_inputs_raise(metric, probs, labels, message):
    with pytest.raises(ValueError, match=message):
        metric(probs, labels)


@pytest.mark.parametrize("metric", [accuracy, nll, ece, brier])
def test_mismatched_batch_or_integer_probs_raise(metric):
    # Under the test suite's jaxtyping hook the annotations reject these first (a TypeError);
    # without it, the library's own check raises ValueError.
    with pytest.raises((ValueError, TypeError)):
        metric(PROBS, torch.tensor([0, 1, 2]))
    with pytest.raises((ValueError, TypeError)):
        metric(torch.tensor([[1, 0]]), torch.tensor([0]))


def test_ece_needs_positive_bins():
    with pytest.raises(ValueError, match="n_bins"):
        ece(PROBS, LABELS, n_bins=0)
