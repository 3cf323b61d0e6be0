"""Conversions between bayesian-lora's factor roots and flaplace's eigen-form factors."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from flaplace.typing import Eigen, Factors, KronFactor


def factor_root(eigen: Eigen) -> Float[Tensor, "d k"]:
    """``R`` with ``R R^T = Q diag(values) Q^T``."""
    return eigen.vectors * eigen.values.clamp_min(0).sqrt()


def _eigen_offactor_root(root: Tensor, dtype: torch.dtype) -> Eigen:
    """Eigen form of ``root @ root.T`` from a thin SVD of the root."""
    vectors, singular, _ = torch.linalg.svd(root.to(dtype), full_matrices=False)
    return Eigen(vectors, singular.square())


def eigen_factors(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    shapes: Mapping[str, torch.Size],
    dtype: torch.dtype,
) -> Factors:
    """bayesian-lora-layout roots as flaplace eigen-form factors.

    ``shapes`` maps each weight's parameter name to its ``(o, i)`` shape, in the order of the
    keys of ``factors``; the result is keyed by parameter name.
    """
    out: Factors = {}
    for name, (key, pair) in zip(shapes, factors.items(), strict=True):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"factors[{key!r}] must be a pair (A, S) of tensors")
        a_root, s_root = pair
        o, i = shapes[name]
        for side, root, want in (("A", a_root, i), ("S", s_root, o)):
            if root.ndim != 2 or root.shape[0] != want:
                raise ValueError(
                    f"factors[{key!r}]: the {side} factor has shape {tuple(root.shape)}, but the weight "
                    f"{name!r} of shape {(o, i)} needs {want} rows"
                )
            if not bool(torch.isfinite(root).all()):
                raise ValueError(f"factors[{key!r}]: the {side} factor is not finite")
        out[name] = KronFactor(
            S=_eigen_offactor_root(s_root, dtype),
            A=_eigen_offactor_root(a_root, dtype),
            transposed=torch.tensor(False, device=s_root.device),
        )
    return out


def weight_name(key: str, names: Iterable[str]) -> str:
    """The parameter name of a factor key: ``key + ".weight"`` (module names) or ``key`` itself."""
    names = set(names)
    for candidate in (f"{key}.weight", key):
        if candidate in names:
            return candidate
    raise ValueError(f"factor key {key!r} matches no parameter (looked for {key + '.weight'!r} and {key!r})")


def prior_precision_of(s2: Tensor | float) -> Tensor | float:
    if isinstance(s2, Tensor):
        if s2.numel() != 1:
            raise ValueError(f"s2 (the prior variance) must be a single number, got shape {tuple(s2.shape)}")
        if not bool(torch.isfinite(s2.detach()).all()) or not bool((s2.detach() > 0).all()):
            raise ValueError(f"s2 (the prior variance) must be positive and finite, got {float(s2.detach())}")
        return 1 / s2
    if not (isinstance(s2, int | float) and math.isfinite(s2) and s2 > 0):
        raise ValueError(f"s2 (the prior variance) must be positive and finite, got {s2!r}")
    return 1 / float(s2)
