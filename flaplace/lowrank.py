"""Streaming top-k eigenpairs of a sum of outer products, never forming the ``d x d`` matrix.

A factor ``F = sum_rows r r^T`` is kept as ``U diag(lam) U^T`` with ``U`` of
shape ``d x m``. A new block of rows ``X`` (``n x d``) is merged by an
incremental eigendecomposition: with ``M = [U diag(sqrt(lam)) | X^T]``
(``d x (m + n)``), ``M M^T = F + X^T X``, whose nonzero eigenpairs follow from
the small Gram matrix ``M^T M`` (``(m+n) x (m+n)``): if ``M^T M = V diag(mu) V^T``
then ``M M^T = (M V mu^{-1/2}) diag(mu) (M V mu^{-1/2})^T``. Keeping the top
``m`` is the only approximation; it is exact while the rank stays below ``m``,
and with an oversampled ``m`` the error on the kept top eigenpairs is of the
order of the discarded tail.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from flaplace.typing import Eigen


def empty_sketch(dim: int, rank: int, *, dtype: torch.dtype, device: torch.device | None = None) -> Eigen:
    """A rank-``rank`` sketch of the zero ``dim x dim`` matrix.

    Example:
        >>> sketch = empty_sketch(4096, 20, dtype=torch.float32)  # vectors (4096, 20), no 4096 x 4096
    """
    if not rank >= 1:
        raise ValueError(f"a low-rank sketch needs rank >= 1, got {rank}")
    rank = min(rank, dim)
    return Eigen(
        torch.zeros((dim, rank), dtype=dtype, device=device), torch.zeros(rank, dtype=dtype, device=device)
    )


def merge_rows(sketch: Eigen, rows: Float[Tensor, "n d"], *, chunk: int = 128) -> Eigen:
    """Add ``rows^T rows`` to the sketch and keep its top ``m`` eigenpairs.

    Rows are merged ``chunk`` at a time so that the Gram matrices stay small.

    Example:
        >>> sketch = merge_rows(empty_sketch(512, 10, dtype=torch.float64), torch.randn(64, 512, dtype=torch.float64))
    """
    if rows.ndim != 2 or rows.shape[1] != sketch.vectors.shape[0]:
        raise ValueError(f"rows must be (n, {sketch.vectors.shape[0]}), got {tuple(rows.shape)}")
    rows = rows.to(sketch.vectors.dtype)
    for start in range(0, rows.shape[0], chunk):
        sketch = _merge(sketch, rows[start : start + chunk])
    return sketch


def merge_sketches(sketches: list[Eigen], rank: int) -> Eigen:
    """The top-``rank`` eigenpairs of the sum of several sketches (e.g. from several ranks).

    Example:
        >>> total = merge_sketches([s1, s2], rank=20)
    """
    roots = torch.cat([s.vectors * s.values.clamp_min(0).sqrt() for s in sketches], dim=1)
    return _top_eigenpairs(roots, min(rank, roots.shape[0]))


def _merge(sketch: Eigen, rows: Tensor) -> Eigen:
    m = sketch.values.shape[0]
    roots = torch.cat([sketch.vectors * sketch.values.clamp_min(0).sqrt(), rows.T], dim=1)
    return _top_eigenpairs(roots, m)


def _top_eigenpairs(roots: Float[Tensor, "d r"], rank: int) -> Eigen:
    """Top ``rank`` eigenpairs of ``roots @ roots.T`` through the Gram matrix of ``roots``."""
    mu, v = torch.linalg.eigh(roots.T @ roots)
    mu, v = mu.flip(0)[:rank], v.flip(1)[:, :rank]
    if mu.shape[0] < rank:  # fewer columns than the rank: pad with zero directions
        pad = rank - mu.shape[0]
        mu = torch.cat([mu, mu.new_zeros(pad)])
        v = torch.cat([v, v.new_zeros(v.shape[0], pad)], dim=1)
    # Directions with (numerically) zero eigenvalue carry no information; zero them.
    tol = (
        mu[:1].clamp_min(0) * (roots.shape[1] * torch.finfo(roots.dtype).eps) + torch.finfo(roots.dtype).tiny
    )
    keep = mu > tol
    mu = torch.where(keep, mu, torch.zeros_like(mu))
    scale = torch.where(keep, mu.clamp_min(torch.finfo(roots.dtype).tiny).rsqrt(), torch.zeros_like(mu))
    return Eigen((roots @ v) * scale, mu)


def dense_eigen(matrix: Float[Tensor, "d d"], rank: int | None = None) -> Eigen:
    """Eigen form of a symmetric PSD matrix, eigenvalues descending, optionally the top ``rank``.

    Negative eigenvalues from round-off are clamped to zero.

    Example:
        >>> eig = dense_eigen(torch.eye(3))
    """
    values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    if rank is not None:
        values, vectors = values[:rank], vectors[:, :rank]
    return Eigen(vectors, values)
