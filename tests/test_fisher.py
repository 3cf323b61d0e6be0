"""fisher: the Fisher cotangents against the closed form of the categorical GGN's Lambda.

Moved here from tests/test_kfac_exact.py, so that the tests mirror the modules.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_exact_cotangents_are_a_rank_c_minus_1_root_of_lambda(classes):
    """C - 1 cotangents per example whose outer products sum to diag(p) - p p^T, also for peaked p."""
    from flaplace.fisher import fisher_cotangents

    torch.manual_seed(classes)
    scales = torch.tensor([0.1, 3.0, 50.0], dtype=torch.float64).repeat(14)[:40, None]  # flat to peaked p
    logits = torch.randn(40, classes, dtype=torch.float64) * scales
    logits[0] = 0.0  # uniform p: every u_k ties; the argmax still picks one column to drop
    v = fisher_cotangents(logits, "categorical", "exact")
    assert v.shape == (classes - 1, 40, classes)
    p = logits.softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert torch.allclose(torch.einsum("kbi,kbj->bij", v, v), lam, atol=1e-15, rtol=0)
