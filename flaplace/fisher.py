"""Cotangents of the logits whose pull-backs build the Fisher / GGN factors.

For logits ``f`` of one example, the curvature of the negative log-likelihood
in ``f`` is ``Lambda``. Each function here returns ``K`` cotangent vectors
``v_k`` per example with ``sum_k v_k v_k^T`` equal to (or, for ``mc``, an
unbiased estimate of) the matrix the Fisher type asks for:

* ``exact``: ``Lambda`` itself, through the columns of a square root (``C - 1`` of them
  for the categorical likelihood, whose ``Lambda`` has rank ``C - 1``);
* ``mc``: ``E_y[grad grad^T]`` with ``y`` sampled from the model, ``k`` samples, each scaled by ``1/sqrt(k)``;
* ``empirical``: ``grad grad^T`` at the true targets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import get_args

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from flaplace.typing import FisherType, Likelihood

#: The accepted values of ``likelihood`` and ``fisher`` (from the `Likelihood` and `FisherType` types).
LIKELIHOODS: tuple[str, ...] = get_args(Likelihood)
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)


def check_likelihood(likelihood: str, n_outputs: int) -> None:
    """Raise a clear error when ``likelihood`` is unknown or does not fit ``n_outputs`` logits."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
    if likelihood == "bernoulli" and n_outputs != 1:
        raise ValueError(f"the bernoulli likelihood needs one logit per example, got {n_outputs}")
    if likelihood == "categorical" and n_outputs < 2:
        raise ValueError("the categorical likelihood needs at least two logits per example")


def fisher_cotangents(
    logits: Float[Tensor, "batch classes"],
    likelihood: Likelihood,
    fisher: FisherType,
    *,
    targets: Tensor | None = None,
    n_samples: int = 1,
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "k batch classes"]:
    """Cotangents ``v`` (``K`` per example) with ``sum_k v v^T`` the Fisher type's matrix in the logits.

    Args:
        logits: ``(batch, C)``; ``C = 1`` for ``bernoulli``.
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian`` (noise ``sigma``).
        fisher: ``exact`` (``K = C - 1`` categorical, ``K = C`` otherwise), ``mc`` (``K = n_samples``) or ``empirical`` (``K = 1``).
        targets: class indices (categorical), 0/1 (bernoulli) or values
            ``(batch, C)`` (gaussian); needed for ``empirical`` only.
        n_samples: samples for ``mc``.
        sigma: the Gaussian noise standard deviation.
        generator: the random generator for ``mc`` (reproducible draws).

    Examples:
        >>> v = fisher_cotangents(torch.randn(4, 3), "categorical", "exact")  # (2, 4, 3)
    """
    check_likelihood(likelihood, logits.shape[-1])
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown Fisher type {fisher!r}; choose one of {FISHER_TYPES}")
    logits = logits.detach()
    if fisher == "exact":
        return _exact(logits, likelihood, sigma)
    if fisher == "mc":
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        return _sampled(logits, likelihood, n_samples, sigma, generator)
    if targets is None:
        raise ValueError("the empirical Fisher needs the batch's targets")
    return _residual(logits, likelihood, targets.to(logits.device), sigma).unsqueeze(0)


def _exact(logits: Tensor, likelihood: str, sigma: float) -> Tensor:
    if likelihood == "categorical":
        return _categorical_root(logits.softmax(-1))
    if likelihood == "bernoulli":
        p = logits.sigmoid()
        return (p * (1 - p)).sqrt().unsqueeze(0)
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device) / sigma
    return eye[:, None, :].expand(-1, logits.shape[0], -1)


def _categorical_root(p: Float[Tensor, "batch classes"]) -> Float[Tensor, "classes_minus_one batch classes"]:
    """``C - 1`` columns ``b_j`` per example with ``sum_j b_j b_j^T = diag(p) - p p^T``.

    ``Lambda = D (I - u u^T) D`` with ``D = diag(sqrt p)`` and the unit vector
    ``u = sqrt p``: it has rank ``C - 1`` (``Lambda 1 = 0``), so ``C - 1`` pull-backs
    suffice where the symmetric square root needs ``C``. The Householder reflection
    ``H = I - v v^T / (1 + u_k)``, ``v = u + e_k``, ``k = argmax p`` maps ``u`` to
    ``-e_k``; its other ``C - 1`` columns are an orthonormal basis of ``u``'s complement,
    so ``I - u u^T = sum_{j != k} h_j h_j^T`` and ``b_j = D h_j``. Choosing the largest
    ``u_k`` keeps ``1 + u_k >= 1 + 1/sqrt(C)`` away from zero.
    """
    batch, classes = p.shape
    u = p.sqrt()
    k = p.argmax(-1, keepdim=True)  # (batch, 1)
    v = u + F.one_hot(k[:, 0], classes).to(u.dtype)
    eye = torch.eye(classes, dtype=u.dtype, device=u.device)
    reflection = eye - v[:, :, None] * v[:, None, :] / (1 + u.gather(1, k))[:, :, None]  # (batch, C, C)
    others = torch.arange(classes - 1, device=p.device).expand(batch, -1)
    others = others + (others >= k).long()  # the columns j != k, in order
    columns = reflection.gather(2, others[:, None, :].expand(-1, classes, -1))  # (batch, C, C - 1)
    return (u[:, :, None] * columns).permute(2, 0, 1)


def _sampled(logits: Tensor, likelihood: str, k: int, sigma: float, generator) -> Tensor:
    scale = 1.0 / math.sqrt(k)
    if likelihood == "categorical":
        p = logits.softmax(-1)
        draws = torch.multinomial(p, k, replacement=True, generator=generator).T  # (k, batch)
        return (F.one_hot(draws, p.shape[-1]).to(p.dtype) - p) * scale
    if likelihood == "bernoulli":
        p = logits.sigmoid()
        u = torch.rand((k, *p.shape), dtype=p.dtype, device=p.device, generator=generator)
        return ((u < p).to(p.dtype) - p) * scale
    eps = torch.randn((k, *logits.shape), dtype=logits.dtype, device=logits.device, generator=generator)
    return eps * (scale / sigma)


def _residual(logits: Tensor, likelihood: str, targets: Tensor, sigma: float) -> Tensor:
    """Gradient of the log-likelihood in the logits at the true targets."""
    if likelihood == "categorical":
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"categorical targets must have shape {tuple(logits.shape[:1])}")
        labels = targets.long()
        if labels.min() < 0 or labels.max() >= logits.shape[-1]:
            raise ValueError(f"a target is outside the classes 0..{logits.shape[-1] - 1}")
        return F.one_hot(labels, logits.shape[-1]).to(logits.dtype) - logits.softmax(-1)
    if likelihood == "bernoulli":
        y = targets.reshape(logits.shape).to(logits.dtype)
        return y - logits.sigmoid()
    if targets.shape != logits.shape:
        raise ValueError(f"gaussian targets must have the logits' shape {tuple(logits.shape)}")
    return (targets.to(logits.dtype) - logits) / sigma**2


def log_likelihood(
    logits: Float[Tensor, "batch classes"], targets: Tensor, likelihood: Likelihood, sigma: float = 1.0
) -> Float[Tensor, ""]:
    """Summed log-likelihood of ``targets`` under ``logits``.

    Examples:
        >>> log_likelihood(torch.zeros(2, 2), torch.tensor([0, 1]), "categorical")  # 2 log(1/2)
        tensor(-1.3863)
    """
    check_likelihood(likelihood, logits.shape[-1])
    if likelihood == "categorical":
        return -F.cross_entropy(logits, targets.long(), reduction="sum")
    if likelihood == "bernoulli":
        y = targets.reshape(logits.shape).to(logits.dtype)
        return -F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    residual = targets.to(logits.dtype) - logits
    n = residual.numel()
    return -0.5 * (residual**2).sum() / sigma**2 - n * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


def example_cotangents(
    logits: Tensor,
    likelihood: Likelihood,
    fisher: FisherType,
    targets: Tensor | None,
    n_samples: int,
    sigma: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> tuple[int, Iterator[Tensor], Float[Tensor, ""]]:
    """K-FAC's cotangents of one-row-per-example logits and the batch's log-likelihood (NaN without targets).

    Raises:
        ValueError: token logits ``(batch, tokens, vocab)`` with a categorical likelihood (they
            need causal-LM token labels in the batch).

    Examples:
        >>> count, cotangents, ll = example_cotangents(
        ...     torch.zeros(2, 2), "categorical", "exact", torch.tensor([0, 1]),
        ...     n_samples=1, sigma=1.0, generator=None, dtype=torch.float64)
        >>> count, round(float(ll), 4)
        (1, -1.3863)
    """
    if logits.ndim == 3 and likelihood == "categorical":
        raise ValueError(
            f"the model function returned token logits {tuple(logits.shape)}, but the batch has no "
            "causal-LM token labels ('labels' of the shape of 'input_ids', -100 = no loss): pass "
            "them, or use an output function with one row of logits per example"
        )
    stacked = fisher_cotangents(
        logits, likelihood, fisher, targets=targets, n_samples=n_samples, sigma=sigma, generator=generator
    )
    # without targets the log-likelihood is unknown from now on (NaN): the evidence needs every example's
    if targets is None:
        ll = logits.new_tensor(float("nan"), dtype=dtype)
    else:
        ll = log_likelihood(logits.detach().to(dtype), targets, likelihood, sigma)
    return len(stacked), iter(stacked), ll
