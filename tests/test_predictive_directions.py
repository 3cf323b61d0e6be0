"""The predictive restricted to the data-informed directions (``directions="informed"``).

Reference: the dense Kronecker curvature ``K = S (x) A`` of each block, eigendecomposed with
``eigh``; the informed covariance is ``sum_{e_k > lambda} v_k v_k^T / (e_k + lambda)`` over its
eigenpairs, built and applied to the flattened Jacobians by hand (complete, thin and transposed
factors, as in test_predictive.py).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from jaxtyping import TypeCheckError
from test_predictive import SPECS, flat_jacobian, make_posterior

from flaplace.jacobian_cache import JacobianCache, cached_covariance
from flaplace.links import predictive_probs
from flaplace.predictive import predictive_covariance, predictive_precompute

F64 = torch.float64


def dense_informed_covariance(posterior) -> tuple[torch.Tensor, int, int]:
    """Block-diagonal informed covariance, and how many directions it keeps out of how many."""
    blocks, kept, total = [], 0, 0
    for name, factor in posterior.factors.items():
        curvature = torch.kron(factor.S.dense(), factor.A.dense())
        values, vectors = torch.linalg.eigh(curvature)
        lam = posterior.prior_precision[name]
        keep = values > lam
        kept, total = kept + int(keep.sum()), total + len(values)
        v = vectors[:, keep]
        blocks.append(v @ torch.diag(1 / (values[keep] + lam)) @ v.T)
    return torch.block_diag(*blocks), kept, total


def jacobians_for(posterior, seed: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(4, 3, *p.shape, generator=g, dtype=F64) for n, p in posterior.mean.items()}


@pytest.mark.parametrize("case", list(SPECS))
def test_informed_covariance_matches_the_dense_eigendecomposition(case: str) -> None:
    posterior = make_posterior(SPECS[case])
    jac = jacobians_for(posterior)
    J = flat_jacobian(posterior, jac)
    covariance, kept, total = dense_informed_covariance(posterior)
    assert 0 < kept < total  # the test covers both kept and dropped directions
    reference = J @ covariance @ J.mT
    informed = predictive_covariance(predictive_precompute(posterior, "informed"), jac)
    torch.testing.assert_close(informed, reference, rtol=1e-8, atol=1e-10)
    # it is the whole posterior's covariance minus a PSD part: never larger along any direction
    gap = predictive_covariance(posterior, jac) - informed
    assert torch.linalg.eigvalsh(gap).min() > -1e-10
    assert gap.diagonal(dim1=1, dim2=2).min() > 1e-6
    # the Jacobian cache path gives the same
    cache = JacobianCache(torch.zeros(4, 3, dtype=F64), [jac])
    torch.testing.assert_close(cached_covariance(posterior, cache, "informed"), reference)


def test_informed_covariance_vanishes_when_the_prior_outweighs_every_direction() -> None:
    posterior = make_posterior(SPECS["full"])
    strong = posterior._replace(prior_precision={n: torch.tensor(1e3, dtype=F64) for n in posterior.mean})
    informed = predictive_covariance(predictive_precompute(strong, "informed"), jacobians_for(strong))
    assert informed.abs().max() == 0


def test_unknown_directions_are_refused() -> None:
    posterior = make_posterior(SPECS["full"])
    with pytest.raises((ValueError, TypeCheckError)):  # the suite's type-check hook may fire first
        predictive_precompute(posterior, "uninformed")  # type: ignore[arg-type]
    unchecked = inspect.unwrap(predictive_precompute)  # the function's own check, without the hook
    with pytest.raises(ValueError, match="directions must be 'all' or 'informed'"):
        unchecked(posterior, "uninformed")


@pytest.mark.parametrize("link", ["probit", "mc", "bridge"])
def test_every_link_gives_the_softmax_of_a_point_mass(link: str) -> None:
    # where the data inform no direction the informed covariance is 0: the predictive is the MAP's
    g = torch.Generator().manual_seed(0)
    f_mu = torch.randn(3, 4, generator=g, dtype=F64)
    a = torch.randn(3, 4, 4, generator=g, dtype=F64)
    f_var = a @ a.mT
    f_var[1] = 0  # one point-mass row among rows with a variance
    probs = predictive_probs(f_mu, f_var, link, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(probs[1], f_mu[1].softmax(-1), rtol=1e-12, atol=1e-12)
    alone = predictive_probs(f_mu[[0, 2]], f_var[[0, 2]], link, generator=torch.Generator().manual_seed(1))
    if link != "mc":  # the samples of the other rows depend on the batch
        torch.testing.assert_close(probs[[0, 2]], alone, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(probs[0], f_mu[0].softmax(-1), atol=1e-3)  # the others are widened
