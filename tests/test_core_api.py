"""The core's single-type APIs: option tuples from the Literal types, Eigen.dense, KFACFit,
and the Jacobian cache that scores many priors without recomputing Jacobians."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

import flaplace
from flaplace import fisher, jacobian_cache, jacobians, kfac, kfac_state
from flaplace.typing import Eigen, FisherType, Likelihood, Sharing


def test_option_tuples_are_the_literal_types():
    assert fisher.FISHER_TYPES == get_args(FisherType) == ("mc", "exact", "empirical")
    assert get_args(Likelihood) == fisher.LIKELIHOODS
    assert kfac.SHARINGS == get_args(Sharing) == ("expand", "reduce", "last")
    assert get_args(jacobians.JacobianMethod) == jacobians.JACOBIAN_METHODS


def test_eigen_dense_is_q_diag_qt():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 3, generator=generator, dtype=torch.float64))
    values = torch.rand(3, generator=generator, dtype=torch.float64)
    want = sum(values[k] * torch.outer(q[:, k], q[:, k]) for k in range(3))
    torch.testing.assert_close(Eigen(q, values).dense(), want)
    batched = Eigen(torch.stack([q, q]), torch.stack([values, 2 * values]))
    torch.testing.assert_close(batched.dense()[1], 2 * want)


def _linear_problem():
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    data = [
        (
            torch.randn(6, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=generator),
        )
        for _ in range(3)
    ]
    calls = []

    def model_fn(params, batch):
        calls.append(1)
        return torch.nn.functional.linear(batch[0], params["w"])

    return {"w": w}, model_fn, data, calls


def test_fit_returns_factors_and_state():
    params, model_fn, data, _ = _linear_problem()
    result = flaplace.fit_kfac(model_fn, params, data, fisher="exact", lr_threshold=None, progress=False)
    assert isinstance(result, kfac.KFACFit)
    factors, state = result
    assert set(factors) == {"w"} and float(state.log_likelihood) < 0
    with pytest.warns(DeprecationWarning, match="always returns"):
        flaplace.fit_kfac(model_fn, params, data, fisher="exact", progress=False, return_state=True)


def test_cached_covariance_equals_the_dense_predictive_for_every_prior():
    params, model_fn, data, calls = _linear_problem()
    factors, _ = flaplace.fit_kfac(model_fn, params, data, fisher="exact", lr_threshold=None, progress=False)
    cache = jacobian_cache.cache_jacobians(model_fn, params, data, method="loop")
    n_calls = len(calls)
    x = torch.cat([b[0] for b in data])
    for lam in (0.3, 2.0, 50.0):
        posterior = flaplace.make_posterior(factors, params, lam)
        f_var = jacobian_cache.cached_covariance(posterior, cache)
        # independent reference: dense precision S (x) A + lam I, J = d(x W^T)/d vec(W) row-major
        precision = kfac_state.dense_block(factors["w"]) + lam * torch.eye(12, dtype=torch.float64)
        covariance = torch.linalg.inv(precision)
        jac = torch.einsum("ce,ni->ncei", torch.eye(3, dtype=torch.float64), x).reshape(len(x), 3, 12)
        torch.testing.assert_close(f_var, jac @ covariance @ jac.mT)
    torch.testing.assert_close(cache.logits, x @ params["w"].T)
    assert len(calls) == n_calls  # scoring the priors ran the model no more


def test_jacobians_and_logits_is_per_example_jacobians_plus_the_logits():
    params, model_fn, data, _ = _linear_problem()
    jac, f_mu = jacobians.jacobians_and_logits(model_fn, params, data[0], method="loop")
    torch.testing.assert_close(
        jac["w"], jacobians.per_example_jacobians(model_fn, params, data[0], method="loop")["w"]
    )
    torch.testing.assert_close(f_mu, data[0][0] @ params["w"].T)
