"""A prior centred away from zero (``Posterior.prior_mean``): evidence, tuning, saving, checks.

References: the dense Gaussian evidence with the whole precision materialised, the zero-mean
evidence of the shifted weights, finite differences in ``log lambda``, and the closed-form
stationarity condition ``lambda = gamma / ||theta* - m||^2``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_evidence import LL, dense, make_blocks

from flaplace.evidence import (
    evidence_gradient,
    log_marginal_likelihood,
    prior_distance,
    tune_prior_evidence,
)
from flaplace.posterior import load_posterior, make_posterior, sample, save_posterior, with_prior_precision

DTYPE = torch.float64


def prior_means(params, generator):
    return {n: torch.randn(p.shape, generator=generator, dtype=DTYPE) for n, p in params.items()}


def dense_centred_evidence(factors, params, centre, lam, ll):
    """``LL - 1/2 (theta - m)^T P0 (theta - m) - 1/2 (logdet P - logdet P0)``, all dense."""
    blocks, prior_diag, delta = [], [], []
    for name, factor in factors.items():
        shift = params[name] - centre[name]
        w = shift.T if bool(factor.transposed) else shift
        kron = torch.kron(dense(factor.S), dense(factor.A))
        blocks.append(kron)
        prior_diag.append(torch.full((kron.shape[0],), lam[name], dtype=DTYPE))
        delta.append(w.reshape(-1))
    p0 = torch.diag(torch.cat(prior_diag))
    p = torch.block_diag(*blocks) + p0
    d = torch.cat(delta)
    logdet = torch.linalg.slogdet(p).logabsdet - torch.linalg.slogdet(p0).logabsdet
    return float(ll - 0.5 * d @ p0 @ d - 0.5 * logdet)


@pytest.mark.parametrize("thin", [False, True])
def test_centred_evidence_matches_dense_gaussian(rng, thin):
    factors, params = make_blocks(rng, thin)
    centre = prior_means(params, rng)
    lam = {"l0.lora_A.weight": 0.4, "l0.lora_B.weight": 3.0, "c_attn.weight": 9.0}
    posterior = make_posterior(factors, params, lam, prior_mean=centre)
    got = float(log_marginal_likelihood(posterior, LL))
    assert got == pytest.approx(dense_centred_evidence(factors, params, centre, lam, LL), rel=1e-10)
    # and it is not the zero-mean evidence (the test can fail)
    zero = float(log_marginal_likelihood(make_posterior(factors, params, lam), LL))
    assert abs(got - zero) > 1e-3


def test_centred_evidence_equals_zero_mean_evidence_of_shifted_weights(rng):
    factors, params = make_blocks(rng, thin=True)
    centre = prior_means(params, rng)
    shifted = {n: params[n] - centre[n] for n in params}
    a = log_marginal_likelihood(make_posterior(factors, params, 1.7, prior_mean=centre), LL)
    b = log_marginal_likelihood(make_posterior(factors, shifted, 1.7), LL)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_zero_prior_mean_is_the_default(rng):
    factors, params = make_blocks(rng, thin=False)
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    a = log_marginal_likelihood(make_posterior(factors, params, 0.9), LL)
    b = log_marginal_likelihood(make_posterior(factors, params, 0.9, prior_mean=zeros), LL)
    assert make_posterior(factors, params, 0.9).prior_mean is None
    assert float(a) == float(b)


def test_centred_gradient_in_log_lambda_matches_finite_differences(rng):
    factors, params = make_blocks(rng, thin=True)
    centre = prior_means(params, rng)
    posterior = make_posterior(
        factors, params, {"lora_A": 0.5, "lora_B": 2.0, "c_attn": 4.0}, prior_mean=centre
    )
    got = evidence_gradient(posterior, LL)
    h = 1e-6
    for name in params:
        lam = float(posterior.prior_precision[name])
        values = {n: float(posterior.prior_precision[n]) for n in params}
        up = dict(values, **{name: lam * math.exp(h)})
        down = dict(values, **{name: lam * math.exp(-h)})
        fd = (
            dense_centred_evidence(factors, params, centre, up, LL)
            - dense_centred_evidence(factors, params, centre, down, LL)
        ) / (2 * h)
        assert got[name] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def _gamma(posterior, names, lam):
    total = 0.0
    for n in names:
        f = posterior.factors[n]
        eig = f.S.values.clamp(min=0)[:, None] * f.A.values.clamp(min=0)[None, :]
        total += float((eig / (eig + lam)).sum())
    return total


@pytest.mark.parametrize("centred", [False, True])
def test_fixed_point_agrees_with_gradient_optimum_and_closed_form(rng, centred):
    factors, params = make_blocks(rng, thin=True)
    centre = prior_means(params, rng) if centred else None
    posterior = make_posterior(factors, params, 1.0, prior_mean=centre)
    by_gradient, _ = tune_prior_evidence(posterior, LL, progress=False, tol=1e-9, steps=5000)
    by_fixed_point, history = tune_prior_evidence(
        posterior, LL, progress=False, method="fixed-point", tol=1e-9, steps=5000
    )
    lam_g = float(next(iter(by_gradient.prior_precision.values())))
    lam_f = float(next(iter(by_fixed_point.prior_precision.values())))
    assert lam_f == pytest.approx(lam_g, rel=1e-5)
    # the stationarity condition lambda = gamma / ||theta* - m||^2, from the eigenvalues alone
    distance = sum(float(prior_distance(posterior, n)) for n in params)
    assert lam_f == pytest.approx(_gamma(posterior, params, lam_f) / distance, rel=1e-7)
    assert len(history) < 200  # the fixed point converges in few iterations here


def test_fixed_point_per_group_agrees_with_gradient(rng):
    factors, params = make_blocks(rng, thin=False)
    centre = prior_means(params, rng)
    posterior = make_posterior(factors, params, 1.0, prior_mean=centre)
    groups = ["lora_A", "lora_B", "c_attn"]
    by_gradient, _ = tune_prior_evidence(
        posterior, LL, per_block=groups, progress=False, tol=1e-9, steps=5000
    )
    by_fixed_point, _ = tune_prior_evidence(
        posterior, LL, per_block=groups, progress=False, method="fixed-point", tol=1e-9, steps=5000
    )
    for name in params:
        got = float(by_fixed_point.prior_precision[name])
        assert got == pytest.approx(float(by_gradient.prior_precision[name]), rel=1e-5)
        assert got == pytest.approx(
            _gamma(posterior, [name], got) / float(prior_distance(posterior, name)), rel=1e-7
        )


def test_fixed_point_refuses_a_map_at_the_prior_mean(rng):
    factors, params = make_blocks(rng, thin=False)
    posterior = make_posterior(factors, params, 1.0, prior_mean={n: p.clone() for n, p in params.items()})
    with pytest.raises(ValueError, match="fixed-point"):
        tune_prior_evidence(posterior, LL, progress=False, method="fixed-point")
    with pytest.raises(ValueError, match="method"):
        tune_prior_evidence(posterior, LL, progress=False, method="mackay")


def test_centring_at_the_initialisation_raises_the_tuned_precision(rng):
    """A MAP close to its start: the centred evidence asks for a much tighter prior than the zero-mean one."""
    factors, params = make_blocks(rng, thin=False)
    start = {n: 3.0 * p for n, p in params.items()}  # a large initial norm
    trained = {n: start[n] + 0.05 * p for n, p in params.items()}  # moved a little
    zero, _ = tune_prior_evidence(make_posterior(factors, trained, 1.0), LL, progress=False, steps=3000)
    init, _ = tune_prior_evidence(
        make_posterior(factors, trained, 1.0, prior_mean=start), LL, progress=False, steps=3000
    )
    lam_zero = float(next(iter(zero.prior_precision.values())))
    lam_init = float(next(iter(init.prior_precision.values())))
    assert lam_init > 100 * lam_zero


def test_prior_mean_is_kept_saved_and_loaded(rng, tmp_path):
    factors, params = make_blocks(rng, thin=True)
    centre = prior_means(params, rng)
    posterior = make_posterior(factors, params, 2.0, prior_mean=centre)
    assert with_prior_precision(posterior, 5.0).prior_mean is posterior.prior_mean
    save_posterior(tmp_path / "p.safetensors", posterior)
    loaded = load_posterior(tmp_path / "p.safetensors", params)
    assert loaded.prior_mean is not None
    for n in params:
        assert torch.equal(loaded.prior_mean[n], centre[n])
    assert float(log_marginal_likelihood(loaded, LL)) == float(log_marginal_likelihood(posterior, LL))
    save_posterior(tmp_path / "z.safetensors", make_posterior(factors, params, 2.0))
    assert load_posterior(tmp_path / "z.safetensors", params).prior_mean is None


def test_samples_are_centred_at_the_map_whatever_the_prior_mean(rng):
    factors, params = make_blocks(rng, thin=True)
    centre = prior_means(params, rng)
    a = sample(make_posterior(factors, params, 2.0, prior_mean=centre), 3, torch.Generator().manual_seed(1))
    b = sample(make_posterior(factors, params, 2.0), 3, torch.Generator().manual_seed(1))
    for n in params:
        assert torch.equal(a[n], b[n])


def test_bad_prior_mean_is_named(rng):
    factors, params = make_blocks(rng, thin=False)
    name = "l0.lora_B.weight"
    wrong_shape = {n: torch.zeros(p.shape, dtype=DTYPE) for n, p in params.items()}
    wrong_shape[name] = torch.zeros(1, 1, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"prior_mean of 'l0.lora_B.weight' has shape \(1, 1\)"):
        make_posterior(factors, params, 1.0, prior_mean=wrong_shape)
    missing = {n: torch.zeros(p.shape, dtype=DTYPE) for n, p in params.items() if n != name}
    with pytest.raises(ValueError, match="no tensor for block 'l0.lora_B.weight'"):
        make_posterior(factors, params, 1.0, prior_mean=missing)
    extra = {**{n: torch.zeros(p.shape, dtype=DTYPE) for n, p in params.items()}, "x": torch.zeros(1)}
    with pytest.raises(ValueError, match="'x', which is not a block"):
        make_posterior(factors, params, 1.0, prior_mean=extra)
    nan = {n: torch.full(p.shape, float("nan"), dtype=DTYPE) for n, p in params.items()}
    with pytest.raises(ValueError, match="not finite"):
        make_posterior(factors, params, 1.0, prior_mean=nan)
    posterior = make_posterior(factors, params, 1.0)
    with pytest.raises(ValueError, match="prior_mean"):
        log_marginal_likelihood(posterior._replace(prior_mean=missing), LL)
