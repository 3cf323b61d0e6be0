"""Streaming top-k eigenpairs of a sum of outer products, never forming the ``d x d`` matrix.

A factor ``F = sum_rows r r^T`` is kept as ``U diag(lam) U^T`` with ``U`` of shape ``d x m``.
A new block of rows ``X`` (``n x d``) is merged by a Rayleigh-Ritz step on a small subspace:

1. the part of ``X`` that ``U`` does not explain, ``R = X - X U U^T``, has its dominant
   directions found by a range finder, ``Z = R^T R W`` (plus power steps), with ``W`` a fixed
   pseudo-random ``d x p`` test matrix;
2. ``B`` is an orthonormal basis of ``[U, Z]`` (``d x (m + p)``);
3. ``F + X^T X`` is compressed to ``T = (B^T U) diag(lam) (B^T U)^T + (X B)^T (X B)``
   (``(m+p) x (m+p)``), whose top ``m`` eigenpairs ``(V, mu)`` give ``U' = B V``, ``lam' = mu``.

The old subspace is kept exactly, so the merge is exact whenever the residual ``R`` has rank at
most ``p`` (in particular while fewer than ``m`` rows have been seen); otherwise the new
directions are approximated by the range finder and the tail beyond ``m`` is dropped, an error
of the order of the discarded eigenvalues. The cost is ``O(n d (m + p))`` per merge: matrix
products only, plus a QR of ``d x (m + p)`` and an eigendecomposition of ``(m+p) x (m+p)``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from flaplace.typing import Eigen


def empty_sketch(dim: int, rank: int, *, dtype: torch.dtype, device: torch.device | None = None) -> Eigen:
    """A rank-``rank`` sketch of the zero ``dim x dim`` matrix.

    Examples:
        >>> sketch = empty_sketch(4096, 20, dtype=torch.float32)  # vectors (4096, 20), no 4096 x 4096
    """
    if not rank >= 1:
        raise ValueError(f"a low-rank sketch needs rank >= 1, got {rank}")
    rank = min(rank, dim)
    return Eigen(
        torch.zeros((dim, rank), dtype=dtype, device=device), torch.zeros(rank, dtype=dtype, device=device)
    )


def merge_rows(sketch: Eigen, rows: Float[Tensor, "n d"], *, power_steps: int = 1) -> Eigen:
    """Add ``rows^T rows`` to the sketch and keep its top ``m`` eigenpairs.

    Args:
        sketch: the current sketch (``vectors`` ``d x m``).
        rows: the new rows ``X``.
        power_steps: extra power iterations of the range finder (more accuracy on slowly
            decaying spectra).

    Examples:
        >>> sketch = empty_sketch(512, 10, dtype=torch.float64)
        >>> sketch = merge_rows(sketch, torch.randn(64, 512, dtype=torch.float64))
    """
    vectors, values = sketch
    if rows.ndim != 2 or rows.shape[1] != vectors.shape[0]:
        raise ValueError(f"rows must be (n, {vectors.shape[0]}), got {tuple(rows.shape)}")
    rows = rows.to(vectors.dtype)
    d, m = vectors.shape
    p = max(1, min(m, rows.shape[0], d - m)) if d > m else 0
    if p == 0:  # the sketch spans everything: plain Rayleigh-Ritz in the full basis
        basis = torch.linalg.qr(vectors).Q
    else:
        residual = rows - (rows @ vectors) @ vectors.T
        new = residual.T @ (residual @ _test_matrix(d, p, rows))
        for _ in range(power_steps):
            new = residual.T @ (residual @ torch.linalg.qr(new).Q)
        basis = torch.linalg.qr(torch.cat([vectors, new], dim=1)).Q
    old = basis.T @ vectors
    projected = rows @ basis
    small = (old * values.clamp_min(0)) @ old.T + projected.T @ projected
    mu, v = torch.linalg.eigh(small)
    mu, v = mu.flip(0)[:m].clamp_min(0), v.flip(1)[:, :m]
    return Eigen(basis @ v, mu)


def merge_sketches(sketches: list[Eigen], rank: int) -> Eigen:
    """The top-``rank`` eigenpairs of the sum of several sketches (e.g. from several ranks).

    Exact: the sum of sketches has rank at most the total number of their columns.

    Examples:
        >>> total = merge_sketches([s1, s2], rank=20)
    """
    roots = torch.cat([s.vectors * s.values.clamp_min(0).sqrt() for s in sketches], dim=1)
    basis = torch.linalg.qr(roots).Q
    projected = basis.T @ roots
    mu, v = torch.linalg.eigh(projected @ projected.T)
    rank = min(rank, roots.shape[0])
    mu, v = mu.flip(0)[:rank].clamp_min(0), v.flip(1)[:, :rank]
    return Eigen(basis @ v, mu)


def _test_matrix(d: int, p: int, like: Tensor) -> Tensor:
    """A fixed pseudo-random ``d x p`` matrix (a sine hash: no generator, so it compiles)."""
    i = torch.arange(1, d + 1, dtype=like.dtype, device=like.device)[:, None]
    j = torch.arange(1, p + 1, dtype=like.dtype, device=like.device)[None, :]
    return torch.frac(torch.sin(i * 12.9898 + j * 78.233) * 43758.5453) - 0.5


def dense_eigen(matrix: Float[Tensor, "d d"], rank: int | None = None) -> Eigen:
    """Eigen form of a symmetric PSD matrix, eigenvalues descending, optionally the top ``rank``.

    Negative eigenvalues from round-off are clamped to zero.

    Examples:
        >>> eig = dense_eigen(torch.eye(3))
    """
    values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    if rank is not None:
        values, vectors = values[:rank], vectors[:, :rank]
    return Eigen(vectors, values)
