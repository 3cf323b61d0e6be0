"""Link approximations and softmax's shift invariance (flaplace/links.py).

Softmax ignores a constant added to every logit, so for ``f ~ N(mu, V)`` the exact
``E[softmax(f)]`` is unchanged when ``mu`` moves along the all-ones vector or ``V`` gains
``1 a^T + a 1^T + s 1 1^T``. References are independent of the code under test: numpy
projections, the closed-form binary probit on the logit difference, Monte Carlo with many samples,
and the previous (per-class) probit and (conditioned) bridge formulas written out here, against
which the new links must be no worse.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flaplace
from flaplace.links import (
    centre_moments,
    laplace_bridge_probs,
    mc_probs,
    predictive_probs,
    probit_probs,
)
from flaplace.params import LastTokenLogits, ModelFunction, select_params

F64 = torch.float64
LINKS = ("probit", "bridge", "mc")


def random_moments(batch: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random means and covariances with a smallest eigenvalue of at least 0.5."""
    g = torch.Generator().manual_seed(seed)
    f_mu = 2 * torch.randn(batch, classes, generator=g, dtype=F64)
    a = torch.randn(batch, classes, classes, generator=g, dtype=F64)
    return f_mu, a @ a.mT / classes + 0.5 * torch.eye(classes, dtype=F64)


def shifted(f_mu: torch.Tensor, f_var: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu + t 1, V + 1 a^T + a 1^T + s 1 1^T)``, per example, still positive definite.

    ``x^T V' x >= x^T V x - (a^T x)^2 / s`` (AM-GM on the cross term), so ``s >= |a|^2 / 0.5``
    keeps ``V'`` positive semi-definite when ``V >= 0.5 I``.
    """
    g = torch.Generator().manual_seed(seed)
    batch, classes = f_mu.shape
    t = 30 * torch.randn(batch, 1, generator=g, dtype=F64)
    a = 5 * torch.randn(batch, classes, generator=g, dtype=F64)
    s = a.square().sum(-1) / 0.5 + 100 * torch.rand(batch, generator=g, dtype=F64)
    ones = torch.ones(classes, dtype=F64)
    extra = ones[:, None] * a[:, None, :] + a[:, :, None] * ones + s[:, None, None] * torch.outer(ones, ones)
    return f_mu + t, f_var + extra


def old_probit(f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
    """The per-class probit flaplace had before: ``softmax(mu / sqrt(1 + pi/8 diag V))``."""
    return torch.softmax(f_mu * torch.rsqrt(1 + math.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1)), -1)


def old_bridge(f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
    """The bridge flaplace had before: the Gaussian conditioned on ``sum(f) = 0``, not centred."""
    k = f_mu.shape[-1]
    u = f_var.sum(-1)
    t = u.sum(-1, keepdim=True)
    mu = f_mu - u * f_mu.sum(-1, keepdim=True) / t
    var = f_var.diagonal(dim1=-2, dim2=-1) - u.square() / t
    alpha = (1 - 2 / k + mu.exp() / k**2 * (-mu).exp().sum(-1, keepdim=True)) / var
    return alpha / alpha.sum(-1, keepdim=True)


def mc_tolerance(n_samples: int) -> float:
    """Six standard deviations of the difference of two independent n-sample means of a [0, 1] variable."""
    return 6 * math.sqrt(2 * 0.25 / n_samples)


def probs_of(link: str, f_mu: torch.Tensor, f_var: torch.Tensor, n_samples: int = 20_000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return predictive_probs(f_mu, f_var, link, n_samples=n_samples, generator=generator)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Centring
# ------------------------------------------------------------------------------------------


def test_centre_moments_is_the_projection() -> None:
    f_mu, f_var = random_moments(3, 5, seed=0)
    projection = np.eye(5) - np.ones((5, 5)) / 5
    mu, var = centre_moments(f_mu, f_var)
    np.testing.assert_allclose(mu.numpy(), f_mu.numpy() @ projection, rtol=0, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), projection @ f_var.numpy() @ projection, rtol=0, atol=1e-12)
    shifted_mu, shifted_var = centre_moments(*shifted(f_mu, f_var, seed=1))
    torch.testing.assert_close(shifted_mu, mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(shifted_var, var, rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------------------
# The property: every link ignores the directions softmax ignores
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize(("classes", "seed"), [(2, 0), (3, 1), (4, 2), (7, 3)])
def test_every_link_is_shift_invariant(link: str, classes: int, seed: int) -> None:
    f_mu, f_var = random_moments(4, classes, seed)
    moved_mu, moved_var = shifted(f_mu, f_var, seed + 100)
    before, after = probs_of(link, f_mu, f_var), probs_of(link, moved_mu, moved_var)
    torch.testing.assert_close(before.sum(-1), torch.ones(4, dtype=F64))
    # Probit and bridge: round-off. MC: its sampling error (the eigenvectors of the two centred
    # covariances may differ in sign, so the samples are not the same, only equally distributed).
    tol = mc_tolerance(20_000) if link == "mc" else 1e-10
    torch.testing.assert_close(after, before, rtol=0, atol=tol)
    # The shifts are large enough to be seen: the old per-class probit moves far beyond tol.
    assert (old_probit(moved_mu, moved_var) - old_probit(f_mu, f_var)).abs().max() > 10 * mc_tolerance(20_000)


def test_mc_estimates_the_same_mean_as_sampling_the_raw_moments() -> None:
    """Sampling the centred moments estimates E[softmax(f)] of the raw ones (not a different quantity)."""
    f_mu, f_var = random_moments(3, 4, seed=5)
    n = 50_000
    g = torch.Generator().manual_seed(7)
    logits = torch.distributions.MultivariateNormal(f_mu, f_var).sample((n,))  # raw, independent sampler
    raw = torch.softmax(logits, -1).mean(0)
    centred = mc_probs(f_mu, f_var, n_samples=n, generator=g)
    torch.testing.assert_close(centred, raw, rtol=0, atol=mc_tolerance(n))
    one = mc_probs(f_mu, f_var, n_samples=10, generator=torch.Generator().manual_seed(3))
    two = mc_probs(f_mu, f_var, n_samples=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, two)


# ------------------------------------------------------------------------------------------
# Two classes: the exact binary probit on the logit difference
# ------------------------------------------------------------------------------------------


def test_two_class_probit_is_the_binary_probit_on_the_difference() -> None:
    f_mu, f_var = shifted(*random_moments(6, 2, seed=4), seed=9)  # large shared offset and variance
    probs = probit_probs(f_mu, f_var)
    mu_d = (f_mu[:, 1] - f_mu[:, 0]).numpy()
    var_d = (f_var[:, 1, 1] + f_var[:, 0, 0] - 2 * f_var[:, 0, 1]).numpy()
    binary = 1 / (
        1 + np.exp(-mu_d / np.sqrt(1 + math.pi / 8 * var_d))
    )  # sigmoid(mu_d / sqrt(1 + pi/8 var_d))
    np.testing.assert_allclose(probs[:, 1].numpy(), binary, rtol=0, atol=1e-13)
    np.testing.assert_allclose(probs[:, 0].numpy(), 1 - binary, rtol=0, atol=1e-13)
    # ... which is the bernoulli probit of the one logit d.
    bernoulli = probit_probs(
        torch.from_numpy(mu_d)[:, None], torch.from_numpy(var_d)[:, None, None], likelihood="bernoulli"
    )
    torch.testing.assert_close(probs, bernoulli, rtol=0, atol=1e-13)


def test_probit_for_more_classes_matches_the_mean_field_closed_form() -> None:
    f_mu, f_var = random_moments(3, 4, seed=6)
    mu, var = f_mu.numpy(), f_var.numpy()
    expected = np.empty_like(mu)
    for b in range(3):
        p = np.empty(4)
        for c in range(4):
            p[c] = 1 / sum(
                math.exp(
                    -(mu[b, c] - mu[b, k])
                    / math.sqrt(1 + math.pi / 8 * (var[b, c, c] + var[b, k, k] - 2 * var[b, c, k]))
                )
                for k in range(4)
            )
        expected[b] = p / p.sum()
    np.testing.assert_allclose(probit_probs(f_mu, f_var).numpy(), expected, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Against Monte Carlo on realistic answer-logit moments
# ------------------------------------------------------------------------------------------


def realistic_moments(classes: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments shaped like a causal LM's answer-token logits.

    A shared offset of about 20 with a spread of about 0.4 between the answers; covariance with
    about 90 along a direction close to the all-ones vector and a centred part of about 2.
    """
    g = torch.Generator().manual_seed(seed)
    f_mu = 20 + 2 * torch.randn(batch, 1, generator=g, dtype=F64)
    f_mu = f_mu + 0.4 * torch.randn(batch, classes, generator=g, dtype=F64)
    a = torch.randn(batch, classes, classes, generator=g, dtype=F64)
    centred = a @ a.mT
    centred = centred * (2 / centred.diagonal(dim1=-2, dim2=-1).mean(-1))[:, None, None]
    shared = 90 * (1 + 0.2 * torch.randn(batch, generator=g, dtype=F64)).clamp_min(0.2)
    direction = 1 + 0.05 * torch.randn(batch, classes, generator=g, dtype=F64)
    return f_mu, centred + shared[:, None, None] * direction[:, :, None] * direction[:, None, :]


@pytest.mark.parametrize("classes", [2, 4])
def test_probit_and_bridge_against_many_sample_mc_on_realistic_moments(classes: int) -> None:
    f_mu, f_var = realistic_moments(classes, batch=24, seed=classes)
    n = 60_000
    reference = mc_probs(f_mu, f_var, n_samples=n, generator=torch.Generator().manual_seed(11))
    for new, old in ((probit_probs, old_probit), (laplace_bridge_probs, old_bridge)):
        new_error = (new(f_mu, f_var) - reference).abs()
        old_error = (old(f_mu, f_var) - reference).abs()
        assert new_error.mean() <= old_error.mean()
        assert new_error.max() <= old_error.max()
    probit_error = (probit_probs(f_mu, f_var) - reference).abs()
    if classes == 2:
        # The binary probit is within ~4e-3 of the exact integral; MC adds ~2e-3 at 6 sigma.
        assert probit_error.max() < 1e-2 + mc_tolerance(n)
        assert (old_probit(f_mu, f_var) - reference).abs().max() > 0.05
    else:
        assert probit_error.mean() < 0.6 * (old_probit(f_mu, f_var) - reference).abs().mean()


# ------------------------------------------------------------------------------------------
# A tiny causal LM through LastTokenLogits
# ------------------------------------------------------------------------------------------


class ShiftedAnswerLogits:
    """Answer-token logits plus ``scale * (logit of another token) + offset`` added to every answer.

    The added term is the same for all answers, so softmax over the answers does not change; it
    depends on the parameters, so it moves ``f_mu`` along ``1`` and adds
    ``1 a^T + a 1^T + s 1 1^T`` to ``f_var``: what a causal LM's shared logit offset does.
    """

    def __init__(self, answers: list[int], other: int, scale: float, offset: float):
        self.inner = LastTokenLogits([*answers, other])
        self.scale, self.offset = scale, offset

    def __call__(self, output, batch):
        logits = self.inner(output, batch)
        return logits[:, :-1] + self.scale * logits[:, -1:] + self.offset

    def model_kwargs(self, batch):
        return self.inner.model_kwargs(batch)


def test_causal_lm_answer_logits_shifted_by_a_constant_give_the_same_probabilities() -> None:
    from tiny_models import ANSWERS, float64_rms_norm, padded_batch, tiny_lora_model

    answers = list(ANSWERS)
    with float64_rms_norm():
        model = tiny_lora_model("llama", dtype=F64)
        params = select_params(model, "lora")
        plain = ModelFunction(model, params, LastTokenLogits(answers))
        train = [padded_batch("llama", n=4, seed=s) for s in (1, 2)]
        factors, _ = flaplace.fit_kfac(plain, params, train, fisher="exact", sharing="expand", progress=False)
        posterior = flaplace.make_posterior(factors, params, prior_precision=0.5)
        batch = {k: v for k, v in padded_batch("llama", n=3, seed=5).items() if k != "labels"}
        moments = {"plain": flaplace.linearised_predictive(plain, posterior, batch, method="loop")}
        for name, (scale, offset) in {"constant": (0.0, 20.0), "shared": (3.0, 20.0)}.items():
            output_fn = ShiftedAnswerLogits(answers, other=11, scale=scale, offset=offset)
            moments[name] = flaplace.linearised_predictive(
                ModelFunction(model, params, output_fn), posterior, batch, method="loop"
            )
    f_mu, f_var = moments["plain"]
    assert (moments["constant"][0] - f_mu - 20).abs().max() < 1e-8
    torch.testing.assert_close(moments["constant"][1], f_var)
    # The parameter-dependent shared term really adds variance along the all-ones direction.
    assert (moments["shared"][1] - f_var).abs().max() > 1e-2
    torch.testing.assert_close(
        centre_moments(*moments["shared"])[1], centre_moments(f_mu, f_var)[1], rtol=1e-8, atol=1e-10
    )
    for link in LINKS:
        reference = probs_of(link, f_mu, f_var)
        for name in ("constant", "shared"):
            tol = mc_tolerance(20_000) if link == "mc" else 1e-8
            torch.testing.assert_close(probs_of(link, *moments[name]), reference, rtol=0, atol=tol)
    # The old per-class probit is not invariant on this model.
    assert (old_probit(*moments["constant"]) - old_probit(f_mu, f_var)).abs().max() > 1e-2


@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_float32_moments_with_a_large_shared_part_lose_no_accuracy(link: str) -> None:
    """Causal-LM moments come in float32: centring first keeps the shared 20 / 90 from cancelling."""
    f_mu, f_var = realistic_moments(4, batch=16, seed=3)
    exact = probs_of(link, f_mu, f_var)
    single = probs_of(link, f_mu.float(), f_var.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=0, atol=1e-4)
