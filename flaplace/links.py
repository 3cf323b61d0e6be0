"""Link approximations: class probabilities from the Gaussian predictive ``N(f_mu, f_var)`` of the logits.

Softmax ignores a constant added to every logit: ``softmax(f + t 1) = softmax(f)``. So the exact
predictive ``E[softmax(f)]``, ``f ~ N(mu, V)``, depends on ``(mu, V)`` only through the centred
moments ``(P mu, P V P)``, ``P = I - 1 1^T / C``: with ``Pf = f - mean(f) 1`` we have
``softmax(f) = softmax(Pf)`` and ``Pf ~ N(P mu, P V P)``. Since ``P 1 = 0``, shifting ``mu`` along
``1`` or adding ``1 a^T + a 1^T + s 1 1^T`` to ``V`` leaves the centred moments, hence the exact
predictive, unchanged. Every categorical link here has the same invariance:

* `mc_probs` and `laplace_bridge_probs` work on the centred moments
  (`centre_moments`);
* `probit_probs` uses only the logit differences ``f_c - f_k``, whose means and variances
  ``V_cc + V_kk - 2 V_ck = (e_c - e_k)^T V (e_c - e_k)`` do not see those directions because
  ``(e_c - e_k)^T 1 = 0``.

This matters for the answer-token logits of a causal LM: they share a large offset, and most of
``f_var`` lies along ``1`` (see docs/predictive.md). The bernoulli likelihood (one logit, sigmoid)
has no such direction and its links are the usual one-logit forms; `gaussian_predictive`
serves the gaussian likelihood.
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

import torch
from jaxtyping import Float
from torch import Tensor

from flaplace.typing import Likelihood

Link: TypeAlias = Literal["probit", "mc", "bridge"]

__all__ = [
    "Link",
    "centre_moments",
    "gaussian_predictive",
    "laplace_bridge_probs",
    "mc_probs",
    "predictive_probs",
    "probit_probs",
]


def _check_moments(f_mu: Tensor, f_var: Tensor, likelihood: Likelihood) -> None:
    if f_mu.ndim != 2 or f_var.shape != (*f_mu.shape, f_mu.shape[-1]):
        raise ValueError(
            f"expected f_mu (B, C) and f_var (B, C, C), got {tuple(f_mu.shape)} and {tuple(f_var.shape)}"
        )
    if likelihood not in ("categorical", "bernoulli", "gaussian"):
        raise ValueError(f"likelihood must be 'categorical', 'bernoulli' or 'gaussian', got {likelihood!r}")
    if likelihood == "bernoulli" and f_mu.shape[-1] != 1:
        raise ValueError(f"the bernoulli likelihood takes one logit per example, got {f_mu.shape[-1]}")
    if not torch.compiler.is_compiling() and not (torch.isfinite(f_mu).all() and torch.isfinite(f_var).all()):
        raise ValueError("f_mu or f_var has non-finite entries")


def _two_outcomes(p: Tensor) -> Tensor:
    """Probabilities ``(B,)`` of the positive outcome as ``(B, 2)``: ``[1 - p, p]``."""
    return torch.stack([1 - p, p], dim=-1)


def centre_moments(
    f_mu: Float[Tensor, "batch classes"],
    f_var: Float[Tensor, "batch classes classes"],
) -> tuple[Float[Tensor, "batch classes"], Float[Tensor, "batch classes classes"]]:
    """The moments of the centred logits ``Pf = f - mean(f) 1``: ``(P f_mu, P f_var P)``.

    ``P = I - 1 1^T / C`` removes the one direction softmax ignores, so a categorical link gives
    the same probabilities for ``(f_mu, f_var)`` and for the centred moments, and the centred
    moments do not change when ``f_mu`` moves along ``1`` or ``f_var`` gains
    ``1 a^T + a 1^T + s 1 1^T``. ``P f_var P`` is singular: ``1`` is in its null space.

    Args:
        f_mu: mean logits ``(B, C)``.
        f_var: logit covariance ``(B, C, C)``.

    Returns:
        ``(P f_mu (B, C), P f_var P (B, C, C))``; each row of both sums to zero (to round-off).

    Examples:
        >>> f_mu = torch.tensor([[20.3, 19.9]])
        >>> f_var = torch.tensor([[[91.0, 89.0], [89.0, 90.0]]])
        >>> mu, var = centre_moments(f_mu, f_var)
        >>> mu
        tensor([[ 0.2000, -0.2000]])
        >>> var  # Var(f_1 - f_0) / 4 = 3 / 4 on the diagonal
        tensor([[[ 0.7500, -0.7500],
                 [-0.7500,  0.7500]]])
    """
    mu = f_mu - f_mu.mean(-1, keepdim=True)
    var = (
        f_var
        - f_var.mean(-1, keepdim=True)
        - f_var.mean(-2, keepdim=True)
        + f_var.mean((-2, -1), keepdim=True)
    )
    return mu, var


def mc_probs(
    f_mu: Float[Tensor, "batch classes"],
    f_var: Float[Tensor, "batch classes classes"],
    n_samples: int = 1000,
    generator: torch.Generator | None = None,
    likelihood: Likelihood = "categorical",
) -> Float[Tensor, "batch outcomes"]:
    """Monte Carlo predictive probabilities: sample logits, squash each sample, then average.

    For the categorical likelihood the centred moments ``(P f_mu, P f_var P)``
    (`centre_moments`) are sampled. Since ``softmax(f) = softmax(Pf)`` and
    ``Pf ~ N(P f_mu, P f_var P)``, this estimates the same ``E[softmax(f)]`` as sampling the raw
    moments, and the estimate no longer depends on shifts along the all-ones direction (up to
    round-off in the eigenvectors). Logit samples are ``mu + L eps`` with ``L = U sqrt(max(w, 0))``
    from the eigen-decomposition ``var = U diag(w) U^T`` (robust to singular or slightly
    indefinite covariances, no jitter). Probabilities are averaged, not logits.

    Args:
        f_mu: mean logits ``(B, C)``.
        f_var: logit covariance ``(B, C, C)``.
        n_samples: number of logit samples per example (memory ``n_samples * B * C``).
        generator: a ``torch.Generator`` for reproducible samples.
        likelihood: ``"categorical"`` (softmax over ``C``) or ``"bernoulli"`` (``C == 1``,
            sigmoid; returns ``[1 - p, p]``).

    Returns:
        Probabilities ``(B, C)``, or ``(B, 2)`` for the bernoulli likelihood.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> probs = mc_probs(f_mu, f_var, n_samples=10_000, generator=g)
        >>> torch.allclose(probs.sum(-1), torch.ones(()).double())  # ones, (B,)
        True
    """
    _check_moments(f_mu, f_var, likelihood)
    if likelihood == "gaussian":
        raise ValueError("for the gaussian likelihood use gaussian_predictive(f_mu, f_var, sigma)")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if likelihood == "categorical":
        f_mu, f_var = centre_moments(f_mu, f_var)
    eigenvalues, eigenvectors = torch.linalg.eigh(f_var)
    scale = eigenvectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)  # (B, C, C)
    noise = torch.randn((n_samples, *f_mu.shape), generator=generator, dtype=f_mu.dtype, device=f_mu.device)
    logits = f_mu + torch.einsum("bcd,sbd->sbc", scale, noise)
    if likelihood == "bernoulli":
        return _two_outcomes(torch.sigmoid(logits[..., 0]).mean(0))
    return torch.softmax(logits, dim=-1).mean(0)


def probit_probs(
    f_mu: Float[Tensor, "batch classes"],
    f_var: Float[Tensor, "batch classes classes"],
    likelihood: Likelihood = "categorical",
) -> Float[Tensor, "batch outcomes"]:
    """Probit approximation in mean-field form on the logit differences (shift-invariant).

    Softmax is a function of the differences ``d_ck = f_c - f_k`` alone:
    ``softmax_c(f) = 1 / sum_k exp(-d_ck) = 1 / (1 + sum_{k != c} (1 / sigmoid(d_ck) - 1))``.
    Replacing each ``sigmoid(d_ck)`` by the probit approximation of its Gaussian expectation,
    ``E[sigmoid(d)] ~ sigmoid(kappa m)``, ``kappa = (1 + pi/8 v)^(-1/2)`` for ``d ~ N(m, v)``,
    gives the mean-field approximation (Lu, Ie and Sha, 2020)::

        p_c ∝ 1 / sum_k exp(-kappa_ck (mu_c - mu_k)),
        kappa_ck = (1 + pi/8 (V_cc + V_kk - 2 V_ck))^(-1/2),

    normalised to sum to one (for ``C = 2`` it already does). It is invariant to shifts along
    the all-ones direction because it reads ``f_mu`` and ``f_var`` only through ``mu_c - mu_k``
    and ``Var(d_ck) = (e_c - e_k)^T V (e_c - e_k)``, and ``(e_c - e_k)^T 1 = 0``. For ``C = 2`` it
    is exactly the standard binary probit on ``d = f_1 - f_0``:
    ``p_1 = sigmoid(mu_d / sqrt(1 + pi/8 var_d))``, ``var_d = V_11 + V_00 - 2 V_01``. The moments
    are centred first (`centre_moments`), which changes nothing in exact arithmetic and
    avoids cancellation when ``f_var`` is large along the all-ones direction.

    For the bernoulli likelihood (one logit) it is MacKay's ``sigmoid(kappa f_mu)``,
    ``kappa = (1 + pi/8 f_var)^(-1/2)``.

    Args:
        f_mu: mean logits ``(B, C)``.
        f_var: logit covariance ``(B, C, C)``.
        likelihood: ``"categorical"`` or ``"bernoulli"`` (``C == 1``; returns ``[1 - p, p]``).

    Returns:
        Probabilities ``(B, C)``, or ``(B, 2)`` for the bernoulli likelihood.

    Examples:
        >>> f_mu = torch.tensor([[0.0, 1.0]])
        >>> f_var = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]])  # Var(f_1 - f_0) = 2
        >>> probit_probs(f_mu, f_var)[0, 1]  # sigmoid(1 / sqrt(1 + pi/8 * 2))
        tensor(0.6788)
        >>> torch.allclose(probit_probs(f_mu + 20, f_var + 90), probit_probs(f_mu, f_var))
        True
    """
    _check_moments(f_mu, f_var, likelihood)
    if likelihood == "gaussian":
        raise ValueError("for the gaussian likelihood use gaussian_predictive(f_mu, f_var, sigma)")
    if likelihood == "bernoulli":
        kappa = torch.rsqrt(1 + math.pi / 8 * f_var[:, 0, 0])
        return _two_outcomes(torch.sigmoid(kappa * f_mu[:, 0]))
    mu, var = centre_moments(f_mu, f_var)
    diagonal = var.diagonal(dim1=-2, dim2=-1)
    pair_var = (diagonal[:, :, None] + diagonal[:, None, :] - 2 * var).clamp_min(0)  # Var(f_c - f_k)
    kappa = torch.rsqrt(1 + math.pi / 8 * pair_var)
    differences = mu[:, :, None] - mu[:, None, :]  # (B, C, C): mu_c - mu_k
    log_unnormalised = -torch.logsumexp(-kappa * differences, dim=-1)  # the k = c term is exp(0)
    return torch.softmax(log_unnormalised, dim=-1)


def laplace_bridge_probs(
    f_mu: Float[Tensor, "batch classes"],
    f_var: Float[Tensor, "batch classes classes"],
    likelihood: Likelihood = "categorical",
) -> Float[Tensor, "batch outcomes"]:
    """The Laplace bridge (Hobbhahn et al., 2022): the mean of the Dirichlet matched to the centred Gaussian.

    The bridge maps a Gaussian over sum-zero logits to a Dirichlet. The centred logits
    ``Pf ~ N(mu, Sigma) = N(P f_mu, P f_var P)`` (`centre_moments`) are that Gaussian:
    they sum to zero, carry the same softmax as ``f``, and do not change when ``f_mu`` moves along
    ``1`` or ``f_var`` gains ``1 a^T + a 1^T + s 1 1^T``. With ``K`` classes::

        alpha_k = (1 - 2/K + exp(mu_k) / K^2 * sum_l exp(-mu_l)) / Sigma_kk

    and the probabilities are ``alpha / sum(alpha)``. The formula reads only the diagonal
    ``Sigma_kk = Var(f_k - mean(f))``, so the singular direction of ``P f_var P`` (``1``, with
    zero mean and zero variance after centring) needs no inverse or special case. For the
    bernoulli likelihood the logit ``f ~ N(m, v)`` is written as the two logits ``(-f/2, f/2)``
    (softmax of which is ``[1 - sigmoid f, sigmoid f]``), which are already centred.

    Args:
        f_mu: mean logits ``(B, C)``.
        f_var: logit covariance ``(B, C, C)``. The diagonal of its centred form should be
            positive (every class's logit varies relative to the mean of the others); a row
            where it is zero throughout (a point mass, e.g. the predictive of
            ``directions="informed"`` where the data inform no direction) gets the softmax of
            its mean.
        likelihood: ``"categorical"`` or ``"bernoulli"`` (``C == 1``; returns ``[1 - p, p]``).

    Returns:
        Probabilities ``(B, C)``, or ``(B, 2)`` for the bernoulli likelihood.

    Examples:
        >>> probs = laplace_bridge_probs(f_mu, f_var)
        >>> torch.allclose(laplace_bridge_probs(f_mu + 20, f_var + 90), probs)
        True
    """
    _check_moments(f_mu, f_var, likelihood)
    if likelihood == "gaussian":
        raise ValueError("for the gaussian likelihood use gaussian_predictive(f_mu, f_var, sigma)")
    if likelihood == "bernoulli":
        half = torch.tensor([-0.5, 0.5], dtype=f_mu.dtype, device=f_mu.device)
        f_mu = f_mu * half  # (B, 2)
        f_var = f_var * torch.outer(half, half)  # (B, 2, 2)
    k = f_mu.shape[-1]
    mu, var = centre_moments(f_mu, f_var)
    variance = var.diagonal(dim1=-2, dim2=-1)
    # a row with no centred variance is a point mass: its predictive is the softmax of its mean
    point = (variance <= 0).all(-1, keepdim=True)
    variance = torch.where(
        point, torch.ones_like(variance), variance.clamp_min(torch.finfo(variance.dtype).tiny)
    )
    alpha = (1 - 2 / k + mu.exp() / k**2 * (-mu).exp().sum(-1, keepdim=True)) / variance
    return torch.where(point, mu.softmax(-1), alpha / alpha.sum(-1, keepdim=True))


def gaussian_predictive(
    f_mu: Float[Tensor, "batch outputs"],
    f_var: Float[Tensor, "batch outputs outputs"],
    sigma: float | Tensor,
) -> tuple[Float[Tensor, "batch outputs"], Float[Tensor, "batch outputs outputs"]]:
    """Predictive of a Gaussian likelihood: mean ``f_mu``, covariance ``f_var + sigma^2 I``.

    Args:
        f_mu: mean outputs ``(B, C)``.
        f_var: output covariance ``(B, C, C)``.
        sigma: observation noise standard deviation: a number, a 0-d tensor or one per output
            ``(C,)``.

    Returns:
        ``(mean (B, C), covariance (B, C, C))``.

    Examples:
        >>> mean, cov = gaussian_predictive(f_mu, f_var, sigma=0.1)
    """
    _check_moments(f_mu, f_var, "gaussian")
    noise = torch.as_tensor(sigma, dtype=f_mu.dtype, device=f_mu.device).square()
    if noise.ndim > 1 or (noise.ndim == 1 and noise.shape[0] != f_mu.shape[-1]):
        raise ValueError(f"sigma must be a scalar or one value per output, got shape {tuple(noise.shape)}")
    if not torch.compiler.is_compiling() and not (torch.isfinite(noise).all() and (noise > 0).all()):
        raise ValueError("sigma must be positive and finite")
    eye = torch.eye(f_mu.shape[-1], dtype=f_mu.dtype, device=f_mu.device)
    return f_mu, f_var + eye * noise


def predictive_probs(
    f_mu: Float[Tensor, "batch classes"],
    f_var: Float[Tensor, "batch classes classes"],
    link: Link = "probit",
    likelihood: Likelihood = "categorical",
    *,
    n_samples: int = 1000,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "batch outcomes"]:
    """Class probabilities from the logit predictive by a link approximation.

    Every categorical link is invariant to the directions softmax ignores (a shift of ``f_mu``
    along the all-ones vector, ``1 a^T + a 1^T + s 1 1^T`` added to ``f_var``), so the raw
    moments of [`flaplace.predictive.linearised_predictive`][flaplace.predictive.linearised_predictive] can be passed as they are.

    Args:
        f_mu: mean logits ``(B, C)``.
        f_var: logit covariance ``(B, C, C)``.
        link: ``"probit"`` (`probit_probs`), ``"mc"`` (`mc_probs`) or ``"bridge"``
            (`laplace_bridge_probs`).
        likelihood: ``"categorical"`` or ``"bernoulli"`` (one logit; returns ``(B, 2)``
            probabilities ``[1 - p, p]``). For ``"gaussian"`` use `gaussian_predictive`.
        n_samples: samples for ``link="mc"``.
        generator: random generator for ``link="mc"``.

    Returns:
        Probabilities ``(B, C)``, or ``(B, 2)`` for the bernoulli likelihood.

    Examples:
        >>> f_mu, f_var = linearised_predictive(f, posterior, batch)
        >>> probs = predictive_probs(f_mu, f_var, link="mc", n_samples=2000)
    """
    if likelihood == "gaussian":
        raise ValueError("the gaussian likelihood has no class probabilities; use gaussian_predictive")
    if link == "probit":
        return probit_probs(f_mu, f_var, likelihood)
    if link == "mc":
        return mc_probs(f_mu, f_var, n_samples=n_samples, generator=generator, likelihood=likelihood)
    if link == "bridge":
        return laplace_bridge_probs(f_mu, f_var, likelihood)
    raise ValueError(f"link must be 'probit', 'mc' or 'bridge', got {link!r}")
