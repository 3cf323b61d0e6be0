"""``stable_cholesky``: a Cholesky factor with diagonal jitter only where it is needed."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def stable_cholesky(
    K: Tensor,  # noqa: N803 (bayesian-lora's argument name); (..., d, d), checked below
    mult_eps: float = 1e-8,
    abs_eps: float = 1e-8,
    max_tries: int = 1000,
) -> Float[Tensor, "*batch d d"]:
    """Lower Cholesky factor of ``K`` (or of a batch), adding diagonal jitter only where needed.

    First tries ``K`` itself. A matrix that fails is retried with bayesian-lora's jitter
    ``K * (1 + m I) + a I``, ``m = mult_eps * 1.1^t`` and ``a = abs_eps * 1.1^t`` at try ``t``;
    in a batch, each matrix keeps the first (smallest) jitter that works for it. Only the
    lower triangle of ``K`` is read.

    Args:
        K: symmetric positive (semi-)definite matrices ``(..., d, d)``.
        mult_eps: initial relative jitter on the diagonal.
        abs_eps: initial absolute jitter on the diagonal.
        max_tries: number of jittered attempts.

    Returns:
        ``L`` with ``L L^T = K`` (plus the jitter that was needed), lower triangular.

    Raises:
        ValueError: ``K`` is not a batch of square matrices or has non-finite entries, or some
            matrix is still not positive definite after ``max_tries`` attempts (the message
            gives how many and the largest jitter tried).

    Examples:
        >>> L = stable_cholesky(f_var)  # f_var (B, C, C)
        >>> samples = f_mu[..., None] + L @ torch.randn(n, *f_mu.shape, 1)
    """
    if K.ndim < 2 or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be square matrices (..., d, d), got shape {tuple(K.shape)}")
    if not bool(torch.isfinite(K).all()):
        raise ValueError("K has non-finite entries; no jitter can make it positive definite")
    if max_tries < 1 or mult_eps < 0 or abs_eps < 0:
        raise ValueError(
            f"need max_tries >= 1 and non-negative jitter, got {max_tries}, {mult_eps}, {abs_eps}"
        )
    L, info = torch.linalg.cholesky_ex(K)
    failed = info != 0
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    growth = 1.0
    for _ in range(max_tries):
        if not bool(failed.any()):
            return L
        jittered = K * (1 + mult_eps * growth * eye) + abs_eps * growth * eye
        L_try, info = torch.linalg.cholesky_ex(jittered)
        fixed = failed & (info == 0)
        L = torch.where(fixed[..., None, None], L_try, L)
        failed = failed & (info != 0)
        growth *= 1.1
    if not bool(failed.any()):
        return L
    raise ValueError(
        f"stable_cholesky: {int(failed.sum())} of {failed.numel()} matrices of shape {tuple(K.shape[-2:])} "
        f"are not positive definite even with diagonal jitter up to {abs_eps * growth / 1.1:.3g} "
        f"(absolute) and {mult_eps * growth / 1.1:.3g} (relative) after {max_tries} tries; "
        "is K symmetric positive semi-definite?"
    )
