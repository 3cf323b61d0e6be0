"""A cache of per-example Jacobians, to score many prior precisions without recomputing them.

The Jacobians of the logits at the MAP do not depend on the prior, so a data set's
Jacobians are computed once ([`cache_jacobians`][flaplace.jacobian_cache.cache_jacobians])
and every candidate posterior's ``f_var = J Sigma J^T`` comes from them
([`cached_covariance`][flaplace.jacobian_cache.cached_covariance]).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.jacobians import JacobianMethod, jacobians_and_logits
from flaplace.predictive import (
    Directions,
    PredictiveCache,
    predictive_covariance,
    predictive_precompute,
)
from flaplace.typing import Batch, ModelFn, Params, Posterior

__all__ = ["JacobianCache", "cache_jacobians", "cached_covariance"]


class JacobianCache(NamedTuple):
    """The logits and per-batch Jacobians of a data set at the MAP.

    The Jacobians do not depend on the prior, so one cache serves every prior precision
    that is scored (e.g. by [`tune_prior_grid`][flaplace.evidence.tune_prior_grid]) through
    [`cached_covariance`][flaplace.jacobian_cache.cached_covariance].
    """

    logits: Float[Tensor, "n classes"]
    jacobians: list[dict[str, Tensor]]


def cache_jacobians(
    model_fn: ModelFn,
    params: Params,
    batches: Iterable[Batch],
    *,
    method: JacobianMethod = "vmap",
    chunk_size: int | None = None,
    progress: bool = False,
    desc: str = "Jacobians",
) -> JacobianCache:
    """The (detached) logits and Jacobians of every batch, to score many priors without recomputing them.

    Examples:
        >>> import torch
        >>> f = lambda p, b: b[0] @ p["W"].T
        >>> cache = cache_jacobians(f, {"W": torch.randn(3, 4)}, [(torch.randn(2, 4),), (torch.randn(1, 4),)])
        >>> cache.logits.shape, len(cache.jacobians)
        (torch.Size([3, 3]), 2)
    """
    logits, jacobians = [], []
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        jac, f_mu = jacobians_and_logits(model_fn, params, batch, chunk_size=chunk_size, method=method)
        logits.append(f_mu.detach())
        jacobians.append({name: j.detach() for name, j in jac.items()})
    if not logits:
        raise ValueError("cache_jacobians got no batches")
    return JacobianCache(torch.cat(logits), jacobians)


def cached_covariance(
    posterior: Posterior | PredictiveCache, cache: JacobianCache, directions: Directions = "all"
) -> Float[Tensor, "n classes classes"]:
    """``f_var = J Sigma J^T`` of every cached example under ``posterior`` (detached).

    ``directions`` is `predictive_precompute`'s (used when ``posterior`` is a Posterior; a
    `PredictiveCache` was made with its own).

    Examples:
        >>> f_var = cached_covariance(posterior, cache)  # doctest: +SKIP
        >>> f_var_informed = cached_covariance(posterior, cache, "informed")  # doctest: +SKIP
    """
    prepared = predictive_precompute(posterior, directions) if isinstance(posterior, Posterior) else posterior
    return torch.cat([predictive_covariance(prepared, jac) for jac in cache.jacobians]).detach()
