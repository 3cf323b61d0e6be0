"""Posterior construction, prior precision resolution, sampling and save/load (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from flaplace.posterior import (
    assign_blocks,
    covariance_dense,
    make_posterior,
    precision_dense,
    sample,
    with_prior_precision,
)
from flaplace.posterior_io import load_posterior, save_posterior
from flaplace.typing import Eigen, KronFactor

DTYPE = torch.float64


def random_eigen(side: int, rank: int | None, generator: torch.Generator, scale: float = 1.0) -> Eigen:
    """A random PSD matrix in eigen form; ``rank`` keeps the top eigenpairs only (a thin basis)."""
    x = torch.randn(side, side + 2, generator=generator, dtype=DTYPE)
    values, vectors = torch.linalg.eigh(scale * x @ x.T / side)
    if rank is not None:
        values, vectors = values[-rank:], vectors[:, -rank:]
    return Eigen(vectors, values)


def dense(eigen: Eigen) -> torch.Tensor:
    return eigen.dense()


def block(o: int, i: int, generator: torch.Generator, *, thin: bool = False, transposed: bool = False):
    factor = KronFactor(
        S=random_eigen(o, max(1, o - 1) if thin else None, generator, scale=3.0),
        A=random_eigen(i, max(1, i - 1) if thin else None, generator, scale=2.0),
        transposed=torch.tensor(transposed),
    )
    param = torch.randn((i, o) if transposed else (o, i), generator=generator, dtype=DTYPE)
    return factor, param


def blocks(generator: torch.Generator, thin: bool = False):
    names = {
        "model.layers.0.q_proj.lora_A.default.weight": (2, 6, False),
        "model.layers.0.q_proj.lora_B.default.weight": (6, 2, False),
        "h.0.attn.c_attn.weight": (3, 4, True),
    }
    factors, params = {}, {}
    for name, (o, i, transposed) in names.items():
        factors[name], params[name] = block(o, i, generator, thin=thin, transposed=transposed)
    return factors, params


# --------------------------------------------------------------------------- prior precision


def test_scalar_prior_precision_is_stored_per_block_in_factor_dtype(rng):
    factors, params = blocks(rng)
    params32 = {n: p.float() for n, p in params.items()}
    posterior = make_posterior(factors, params32, 2.5)
    assert set(posterior.prior_precision) == set(params)
    for value in posterior.prior_precision.values():
        assert value.shape == () and value.dtype == DTYPE and float(value) == 2.5
    assert posterior.mean["h.0.attn.c_attn.weight"] is params32["h.0.attn.c_attn.weight"]


def test_prior_precision_by_group_keyword_and_exact_name(rng):
    factors, params = blocks(rng)
    posterior = make_posterior(
        factors, params, {"LORA_a": 1.0, "lora_B": 10.0, "h.0.attn.c_attn.weight": 0.5}
    )
    got = {n: float(v) for n, v in posterior.prior_precision.items()}
    assert got == {
        "model.layers.0.q_proj.lora_A.default.weight": 1.0,
        "model.layers.0.q_proj.lora_B.default.weight": 10.0,
        "h.0.attn.c_attn.weight": 0.5,
    }


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        ({"lora": 1.0}, "no prior precision"),  # c_attn uncovered
        ({"lora": 1.0, "lora_A": 2.0, "c_attn": 1.0}, "covered by two"),
        ({"lora": 1.0, "c_attn": 1.0, "mlp": 3.0}, "neither a parameter name"),
        ({}, "empty"),
        (0.0, "positive"),
        (-1.0, "positive"),
        (math.inf, "finite"),
        (math.nan, "finite"),
        ({"lora": 1.0, "c_attn": -2.0}, "positive"),
    ],
)
def test_bad_prior_precision_raises(rng, prior, message):
    factors, params = blocks(rng)
    with pytest.raises(ValueError, match=message):
        make_posterior(factors, params, prior)


def test_prior_precision_tensor_must_be_a_single_number(rng):
    factors, params = blocks(rng)
    with pytest.raises(ValueError, match="single number"):
        make_posterior(factors, params, torch.ones(2, dtype=DTYPE))


def test_assign_blocks_example():
    owner = assign_blocks(["l0.lora_A.weight", "l0.lora_B.weight"], ["lora_a", "lora_b"])
    assert owner == {"l0.lora_A.weight": "lora_a", "l0.lora_B.weight": "lora_b"}


def test_with_prior_precision_keeps_the_graph(rng):
    factors, params = blocks(rng)
    posterior = make_posterior(factors, params, 1.0)
    log_lam = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    updated = with_prior_precision(posterior, {"lora": log_lam.exp(), "c_attn": 2.0})
    total = sum(updated.prior_precision.values())
    (grad,) = torch.autograd.grad(total, log_lam)
    assert float(grad) == pytest.approx(2 * math.exp(0.3))  # two lora blocks share it
    assert float(updated.prior_precision["h.0.attn.c_attn.weight"]) == 2.0
    assert updated.factors is posterior.factors and updated.mean is posterior.mean


# --------------------------------------------------------------------------- validation


def test_names_must_match(rng):
    factors, params = blocks(rng)
    extra = dict(params)
    extra["other.weight"] = torch.zeros(2, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="'other.weight' has no K-FAC factors"):
        make_posterior(factors, extra, 1.0)
    fewer = dict(params)
    del fewer["h.0.attn.c_attn.weight"]
    with pytest.raises(ValueError, match="'h.0.attn.c_attn.weight' have no matching parameter"):
        make_posterior(factors, fewer, 1.0)
    with pytest.raises(ValueError, match="empty"):
        make_posterior({}, {}, 1.0)


def test_shapes_must_match_including_transposed(rng):
    factors, params = blocks(rng)
    bad = dict(params)
    bad["h.0.attn.c_attn.weight"] = params[
        "h.0.attn.c_attn.weight"
    ].T.contiguous()  # (o, i): wrong, it is transposed
    with pytest.raises(ValueError, match="c_attn.*expected side"):
        make_posterior(factors, bad, 1.0)
    bad = dict(params)
    bad["model.layers.0.q_proj.lora_A.default.weight"] = torch.zeros(2, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match="lora_A.*A factor.*expected side 5"):
        make_posterior(factors, bad, 1.0)
    bad = dict(params)
    bad["model.layers.0.q_proj.lora_A.default.weight"] = torch.zeros(12, dtype=DTYPE)
    with pytest.raises(ValueError, match="must be a matrix"):
        make_posterior(factors, bad, 1.0)


def test_non_finite_inputs_raise(rng):
    factors, params = blocks(rng)
    name = "model.layers.0.q_proj.lora_B.default.weight"
    bad = dict(params)
    bad[name] = params[name].clone()
    bad[name][0, 0] = math.nan
    with pytest.raises(ValueError, match="MAP parameters are not finite"):
        make_posterior(factors, bad, 1.0)
    bad_factors = dict(factors)
    values = factors[name].A.values.clone()
    values[0] = math.inf
    bad_factors[name] = factors[name]._replace(A=Eigen(factors[name].A.vectors, values))
    with pytest.raises(ValueError, match="not finite"):
        make_posterior(bad_factors, params, 1.0)


# --------------------------------------------------------------------------- dense helpers


def test_dense_precision_is_kron_plus_prior(rng):
    factor, param = block(3, 2, rng, thin=True)
    posterior = make_posterior({"w": factor}, {"w": param}, 0.7)
    want = torch.kron(dense(factor.S), dense(factor.A)) + 0.7 * torch.eye(6, dtype=DTYPE)
    torch.testing.assert_close(precision_dense(posterior, "w"), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(covariance_dense(posterior, "w") @ want, torch.eye(6, dtype=DTYPE))


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("thin", "transposed"), [(False, False), (True, False), (False, True), (True, True)])
def test_samples_have_the_posterior_mean_and_covariance(thin, transposed):
    gen = torch.Generator().manual_seed(11)
    factor, param = block(3, 2, gen, thin=thin, transposed=transposed)
    posterior = make_posterior({"w": factor}, {"w": param}, 0.5)
    n = 200_000
    draws = sample(posterior, n, generator=torch.Generator().manual_seed(5))["w"]
    assert draws.shape == (n, *param.shape) and draws.dtype == DTYPE
    # vec in the (o, i) row-major order that the dense covariance uses
    flat = (draws.mT if transposed else draws).reshape(n, -1)
    theta = (param.T if transposed else param).reshape(-1)
    sigma = covariance_dense(posterior, "w")
    # The curvature must matter, or the test would only check Sigma = I / lambda: ignoring it would
    # be an error far above the 3e-2 tolerance below.
    assert torch.linalg.matrix_norm(sigma - torch.eye(6, dtype=DTYPE) / 0.5) > 0.3 * torch.linalg.matrix_norm(
        sigma
    )
    # Mean: each coordinate's sample mean has standard error sqrt(Sigma_kk / n); allow 5 of them.
    standard_error = (sigma.diagonal() / n).sqrt()
    assert bool(((flat.mean(0) - theta).abs() < 5 * standard_error).all())
    # Covariance: for Gaussian samples Var(hat Sigma_kl) = (Sigma_kk Sigma_ll + Sigma_kl^2) / n, so the
    # expected squared Frobenius error is (tr(Sigma)^2 + ||Sigma||_F^2) / n and the relative error is
    # about sqrt((d + 1) / n) <= sqrt(7 / 2e5) ~ 0.006 for d = 6: 3e-2 is a ~5-sigma bound.
    centred = flat - flat.mean(0)
    empirical = centred.T @ centred / (n - 1)
    relative = torch.linalg.matrix_norm(empirical - sigma) / torch.linalg.matrix_norm(sigma)
    assert float(relative) < 3e-2


def test_sampling_is_reproducible_and_covers_every_block(rng):
    factors, params = blocks(rng, thin=True)
    posterior = make_posterior(factors, params, 1.0)
    a = sample(posterior, 4, generator=torch.Generator().manual_seed(1))
    b = sample(posterior, 4, generator=torch.Generator().manual_seed(1))
    assert list(a) == list(params)
    for name, p in params.items():
        assert a[name].shape == (4, *p.shape)
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="positive integer"):
        sample(posterior, 0)


# --------------------------------------------------------------------------- save / load


def test_save_load_roundtrip(rng, tmp_path):
    factors, params = blocks(rng, thin=True)
    posterior = make_posterior(factors, params, {"lora_A": 0.25, "lora_B": 4.0, "c_attn": 1.5})
    path = tmp_path / "posterior.safetensors"
    save_posterior(path, posterior)
    for loaded in (load_posterior(path, params), load_posterior(str(path))):
        assert list(loaded.mean) == list(posterior.mean)
        for name in params:
            torch.testing.assert_close(loaded.mean[name], posterior.mean[name], rtol=0, atol=0)
            torch.testing.assert_close(
                loaded.prior_precision[name], posterior.prior_precision[name], rtol=0, atol=0
            )
            got, want = loaded.factors[name], posterior.factors[name]
            for x, y in zip([*got.S, *got.A], [*want.S, *want.A], strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
            assert bool(got.transposed) == bool(want.transposed) and got.transposed.dtype == torch.bool
    draws = sample(loaded, 3, generator=torch.Generator().manual_seed(0))
    again = sample(posterior, 3, generator=torch.Generator().manual_seed(0))
    for name in params:  # equal up to round-off: the saved thin bases are contiguous copies of views
        torch.testing.assert_close(draws[name], again[name], rtol=1e-13, atol=1e-13)


def test_load_checks_names_shapes_and_dtypes(rng, tmp_path):
    factors, params = blocks(rng)
    path = tmp_path / "posterior.safetensors"
    save_posterior(path, make_posterior(factors, params, 1.0))
    lora_a = "model.layers.0.q_proj.lora_A.default.weight"

    other_shape = dict(params)
    other_shape[lora_a] = torch.zeros(4, 6, dtype=DTYPE)  # a model with LoRA rank 4, not 2
    with pytest.raises(ValueError, match=r"lora_A.*shape \(2, 6\).*shape \(4, 6\)"):
        load_posterior(path, other_shape)

    other_dtype = {n: p.float() for n, p in params.items()}
    with pytest.raises(ValueError, match="saved as torch.float64.*torch.float32"):
        load_posterior(path, other_dtype)

    renamed = {n.replace("default", "task"): p for n, p in params.items()}
    with pytest.raises(
        ValueError, match="saved block 'model.layers.0.q_proj.lora_A.default.weight' is not among"
    ):
        load_posterior(path, renamed)

    more = dict(params)
    more["model.layers.1.q_proj.lora_A.default.weight"] = torch.zeros(2, 6, dtype=DTYPE)
    with pytest.raises(ValueError, match="'model.layers.1.q_proj.lora_A.default.weight' has no saved block"):
        load_posterior(path, more)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a flaplace posterior"):
        load_posterior(path)
