"""The linearised (GLM) predictive: ``J Sigma J^T`` from the per-example Jacobians.

Defaults: these core functions compute the exact Laplace predictive (``directions="all"``,
the whole posterior covariance). The one-call [`LaplaceLoRA`][flaplace.laplace.LaplaceLoRA],
the Trainer helpers and ``flaplace run`` default to ``directions="informed"`` instead.

The network is linearised around the MAP ``theta*``: ``f(theta, x) ~ N(f_mu, f_var)`` with
``f_mu = f(theta*, x)`` and ``f_var = J Sigma J^T``, ``Sigma`` the Laplace posterior covariance
(the Conventions page of the docs). For one Kronecker block ``P = S (x) A + lambda I`` with Jacobian slices
``G_c`` (shape ``o x i``) and ``R_c = Q_S^T G_c Q_A``::

    (J Sigma J^T)[c, c'] = (1/lambda) <G_c, G_c'>
                           + sum_ij R_c[i, j] R_c'[i, j] (1/(s_i a_j + lambda) - 1/lambda)

summed over blocks. The Jacobians come from [`flaplace.jacobians`][flaplace.jacobians]. No matrix is inverted: the eigen-decomposition of the factors does the work,
and everything that depends only on the posterior is computed once by
`predictive_precompute`. The link functions that turn ``(f_mu, f_var)`` into class
probabilities are in [`flaplace.links`][flaplace.links].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from flaplace.jacobians import JACOBIAN_METHODS as JACOBIAN_METHODS  # re-exported for existing callers
from flaplace.jacobians import JacobianMethod, jacobians_and_logits
from flaplace.jacobians import per_example_jacobians as per_example_jacobians
from flaplace.params import check_rows
from flaplace.typing import Batch, KronFactor, ModelFn, Params, Posterior

__all__ = [
    "DIRECTIONS",
    "CovarianceFeatures",
    "Directions",
    "PredictiveBlock",
    "PredictiveCache",
    "check_directions",
    "covariance_features",
    "covariance_from_features",
    "informed_directions",
    "linearised_predictive",
    "predictive_covariance",
    "predictive_precompute",
]


# --------------------------------------------------------------------------------------------
# J Sigma J^T from eigen-form Kronecker factors
# --------------------------------------------------------------------------------------------

Directions = Literal["all", "informed"]
"""Which directions of the posterior the predictive covariance keeps (see `predictive_precompute`)."""
DIRECTIONS: tuple[str, ...] = get_args(Directions)


def check_directions(directions: str) -> None:
    """Refuse a ``directions`` that is not one of `DIRECTIONS`.

    Examples:
        >>> check_directions("informed")
    """
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be 'all' or 'informed', got {directions!r}")


def _curvature_grid(factor: KronFactor) -> Tensor:
    """The eigenvalues ``s_i a_j`` of a block's ``S (x) A`` as an ``(ks, ka)`` grid (negatives clamped to 0)."""
    return factor.S.values.clamp_min(0)[:, None] * factor.A.values.clamp_min(0)[None, :]


class PredictiveBlock(NamedTuple):
    """What the predictive covariance needs from one Kronecker block, computed once.

    ``weights[i, j] = 1/(s_i a_j + lambda) - 1/lambda`` for thin bases, ``1/(s_i a_j + lambda)``
    when both bases are square (complete; the ``1/lambda`` term then cancels exactly).
    """

    S_vectors: Float[Tensor, "o ks"]
    A_vectors: Float[Tensor, "i ka"]
    weights: Float[Tensor, "ks ka"]
    inverse_prior: Float[Tensor, ""]
    transposed: Bool[Tensor, ""]


class PredictiveCache(NamedTuple):
    """The posterior in the form the predictive uses: the MAP and one block per parameter."""

    mean: Params
    blocks: dict[str, PredictiveBlock]


def _is_complete(S_vectors: Tensor, A_vectors: Tensor) -> bool:
    """Both eigenbases square: the thin-basis correction ``(1/lambda) <G, G'>`` is not needed."""
    return S_vectors.shape[0] == S_vectors.shape[1] and A_vectors.shape[0] == A_vectors.shape[1]


def predictive_precompute(posterior: Posterior, directions: Directions = "all") -> PredictiveCache:
    """Precompute, once per posterior, everything the predictive covariance needs.

    Default: the exact Laplace covariance (``directions="all"``); `LaplaceLoRA`, the Trainer
    helpers and ``flaplace run`` use ``directions="informed"``.

    The per-block grid of inverse eigenvalues ``1/(s_i a_j + lambda) - 1/lambda`` (or
    ``1/(s_i a_j + lambda)`` for complete bases) is formed here and reused for every batch.
    Eigenvalues below zero (round-off of a PSD factor) are clamped to zero. Differentiable in
    the prior precision.

    ``directions`` chooses the covariance:

    * ``"all"`` (default): the Laplace posterior covariance ``(S (x) A + lambda I)^-1``, exactly.
    * ``"informed"``: only its eigen-directions where the data outweigh the prior,
      ``sum_{k: e_k > lambda} v_k v_k^T / (e_k + lambda)`` with ``e_k = s_i a_j`` and
      ``v_k = q_i (x) q_j``. Every other direction (all but a few hundred of a LoRA model's
      weights, and all of them outside a low-rank factor's basis) is one the training data left
      at the prior, and there the posterior is the prior's ``1/lambda`` alone. Dropping those
      keeps the predictive to what the data determine: it leaves a calibrated MAP as it is and
      still widens an overconfident one (measured in the docs' Priors page).

    Args:
        posterior: ``Posterior(mean, factors, prior_precision)`` with the same keys in all three.
        directions: ``"all"`` or ``"informed"``.

    Returns:
        A `PredictiveCache` pytree, accepted wherever a posterior is.

    Raises:
        ValueError: missing or extra names, a factor whose sides do not match its parameter,
            a prior precision that is not a positive finite scalar, or unknown ``directions``.

    Examples:
        >>> cache = predictive_precompute(posterior)
        >>> for batch in loader:
        ...     f_mu, f_var = linearised_predictive(f, cache, batch)
        >>> informed = predictive_precompute(posterior, directions="informed")
    """
    check_directions(directions)
    mean, factors, prior = posterior.mean, posterior.factors, posterior.prior_precision
    if set(factors) != set(mean) or set(prior) != set(mean):
        raise ValueError(
            "posterior.mean, .factors and .prior_precision need the same names; "
            f"only in mean: {sorted(set(mean) - set(factors))[:3]}, "
            f"only in factors: {sorted(set(factors) - set(mean))[:3]}, "
            f"differing in prior_precision: {sorted(set(prior) ^ set(mean))[:3]}"
        )
    blocks = {}
    for name, factor in factors.items():
        lam = prior[name]
        if lam.numel() != 1:
            raise ValueError(f"prior_precision[{name!r}] must be a scalar, got shape {tuple(lam.shape)}")
        lam = lam.reshape(())
        if not torch.compiler.is_compiling() and not (torch.isfinite(lam) and lam > 0):
            raise ValueError(f"prior_precision[{name!r}] must be positive and finite, got {lam.item()}")
        S, A = factor.S, factor.A
        param = mean[name]
        if param.ndim != 2:
            raise ValueError(
                f"{name!r}: a Kronecker block needs a matrix parameter, got shape {tuple(param.shape)}"
            )
        sides = {tuple(param.shape), tuple(param.shape[::-1])}
        if (S.vectors.shape[0], A.vectors.shape[0]) not in sides:
            raise ValueError(
                f"{name!r}: factor sides S {S.vectors.shape[0]}, A {A.vectors.shape[0]} do not fit "
                f"the parameter of shape {tuple(param.shape)}"
            )
        if S.values.shape != S.vectors.shape[1:] or A.values.shape != A.vectors.shape[1:]:
            raise ValueError(f"{name!r}: eigenvalues and eigenvectors of a factor disagree in number")
        sa = _curvature_grid(factor)
        transposed = factor.transposed.reshape(()).bool()
        if directions == "informed":  # no 1/lam term: the prior-only directions are left out
            weights = torch.where(sa > lam, 1 / (sa + lam), torch.zeros_like(sa))
            blocks[name] = PredictiveBlock(S.vectors, A.vectors, weights, torch.zeros_like(lam), transposed)
            continue
        # Thin: 1/(sa + lam) - 1/lam, written without cancellation.
        weights = 1 / (sa + lam) if _is_complete(S.vectors, A.vectors) else -sa / (lam * (sa + lam))
        blocks[name] = PredictiveBlock(S.vectors, A.vectors, weights, 1 / lam, transposed)
    return PredictiveCache(mean, blocks)


def informed_directions(posterior: Posterior) -> dict[str, int]:
    """Per block, how many eigen-directions the data outweigh the prior in (``s_i a_j > lambda``).

    These are the directions ``directions="informed"`` keeps (see `predictive_precompute`). A
    total of 0 means the informed predictive is the MAP's.

    Examples:
        >>> import torch, flaplace
        >>> eigen = lambda *v: flaplace.Eigen(torch.eye(len(v)), torch.tensor(v))
        >>> factors = {"W": flaplace.KronFactor(eigen(4.0, 0.5), eigen(1.0, 0.1), torch.tensor(False))}
        >>> post = flaplace.make_posterior(factors, {"W": torch.zeros(2, 2)}, prior_precision=1.0)
        >>> informed_directions(post)  # s a = 4.0, 0.4, 0.5, 0.05 against lambda = 1
        {'W': 1}
    """
    counts = {}
    for name, factor in posterior.factors.items():
        counts[name] = int((_curvature_grid(factor) > posterior.prior_precision[name].reshape(())).sum())
    return counts


def _as_cache(posterior: Posterior | PredictiveCache, directions: Directions = "all") -> PredictiveCache:
    if isinstance(posterior, PredictiveCache):
        return posterior
    if isinstance(posterior, Posterior):
        return predictive_precompute(posterior, directions)
    raise TypeError(f"expected a Posterior or a PredictiveCache, got {type(posterior).__name__}")


def _oriented(name: str, block: PredictiveBlock, jac: Tensor) -> Tensor:
    """Jacobian slices as ``(B, C, o, i)``, transposing those of ``(i, o)``-stored weights."""
    o, i = block.S_vectors.shape[0], block.A_vectors.shape[0]
    if jac.ndim != 4:
        raise ValueError(
            f"{name!r}: expected a Jacobian (batch, classes, *weight shape), got {tuple(jac.shape)}"
        )
    if o == i:  # the shape cannot tell; select by the flag without a Python branch
        return torch.where(block.transposed, jac.mT, jac)
    stored_transposed = jac.shape[2:] == (i, o)
    if not stored_transposed and jac.shape[2:] != (o, i):
        raise ValueError(
            f"{name!r}: Jacobian slices {tuple(jac.shape[2:])} do not fit factors of sides ({o}, {i})"
        )
    if not torch.compiler.is_compiling() and bool(block.transposed) != stored_transposed:
        raise ValueError(f"{name!r}: the factor's transposed flag disagrees with the Jacobian shape")
    return jac.mT if stored_transposed else jac


def predictive_covariance(
    posterior: Posterior | PredictiveCache,
    jacobians: dict[str, Tensor],
) -> Float[Tensor, "batch classes classes"]:
    """``J Sigma J^T`` per example, by the block formula of the Conventions page (no matrix inverse).

    For each block, ``R_c = Q_S^T G_c Q_A`` and the covariance gets
    ``sum_ij R_c[i,j] R_c'[i,j] w[i,j]`` plus, for thin bases, ``(1/lambda) <G_c, G_c'>``.

    Args:
        posterior: a [`Posterior`][flaplace.typing.Posterior] or, to reuse the per-posterior work
            across batches, the `PredictiveCache` from `predictive_precompute`.
        jacobians: ``{name: (B, C, *weight shape)}`` from `per_example_jacobians`, with
            exactly the posterior's names. Weights stored ``(i, o)`` (``transposed`` factors)
            keep their stored orientation here.

    Returns:
        ``f_var`` of shape ``(B, C, C)``, symmetric positive semi-definite.

    Raises:
        ValueError: names that differ from the posterior's, shapes that do not fit the factors,
            or non-finite Jacobians.

    Examples:
        >>> jac = per_example_jacobians(f, posterior.mean, batch)
        >>> f_var = predictive_covariance(posterior, jac)  # (B, C, C)
    """
    cache = _as_cache(posterior)
    if set(jacobians) != set(cache.blocks):
        raise ValueError(
            "the Jacobians and the posterior need the same names; "
            f"missing: {sorted(set(cache.blocks) - set(jacobians))[:3]}, "
            f"unknown: {sorted(set(jacobians) - set(cache.blocks))[:3]}"
        )
    shapes = {tuple(jac.shape[:2]) for jac in jacobians.values()}
    if len(shapes) != 1:
        raise ValueError(f"the Jacobians disagree on (batch, classes): {sorted(shapes)}")
    if not torch.compiler.is_compiling():
        bad = [name for name, jac in jacobians.items() if not torch.isfinite(jac).all()]
        if bad:
            raise ValueError(f"non-finite Jacobian entries for {bad[:3]}")
    return covariance_from_features(cache, covariance_features(cache, jacobians))


class CovarianceFeatures(NamedTuple):
    """The part of ``J Sigma J^T`` that does not depend on the prior precision, per example.

    ``rotated[name]``: ``(B, C, ks * ka)``, the slices ``R_c = Q_S^T G_c Q_A`` flattened;
    ``gram[name]``: ``(B, C, C)``, the Gram matrices ``<G_c, G_c'>``, for thin-basis blocks only.
    Computed once, they give the covariance under any prior precision
    ([`covariance_from_features`][flaplace.predictive.covariance_from_features]), e.g. while tuning it.
    """

    rotated: dict[str, Tensor]
    gram: dict[str, Tensor]


def covariance_features(
    posterior: Posterior | PredictiveCache, jacobians: dict[str, Tensor]
) -> CovarianceFeatures:
    """Rotate Jacobian slices into the posterior's eigenbases (and their Gram matrices for thin bases).

    The result depends on the factors' eigenvectors only, not on the prior precision. Half-precision
    Jacobians (bf16/fp16 weights) are cast to the factors' dtype (float32 or wider) first, so the
    covariance is accumulated in it.

    Examples:
        >>> import torch, flaplace
        >>> unit = lambda d: flaplace.Eigen(torch.eye(d), torch.ones(d))
        >>> factors = {"W": flaplace.KronFactor(unit(2), unit(3), torch.tensor(False))}
        >>> post = flaplace.make_posterior(factors, {"W": torch.randn(2, 3)}, prior_precision=1.0)
        >>> features = covariance_features(post, {"W": torch.randn(4, 2, 2, 3)})
        >>> features.rotated["W"].shape
        torch.Size([4, 2, 6])
    """
    cache = _as_cache(posterior)
    rotated: dict[str, Tensor] = {}
    gram: dict[str, Tensor] = {}
    for name, block in cache.blocks.items():
        grads = _oriented(name, block, jacobians[name]).to(block.weights.dtype)
        n, c = grads.shape[:2]
        rotated[name] = (block.S_vectors.mT @ grads @ block.A_vectors).reshape(n, c, -1)
        if not _is_complete(block.S_vectors, block.A_vectors):
            flat = grads.reshape(n, c, -1)
            gram[name] = flat @ flat.mT
    return CovarianceFeatures(rotated, gram)


def covariance_from_features(
    posterior: Posterior | PredictiveCache, features: CovarianceFeatures, directions: Directions = "all"
) -> Float[Tensor, "batch classes classes"]:
    """``J Sigma J^T`` from [`covariance_features`][flaplace.predictive.covariance_features].

    ``sum_ij R_c[i,j] R_c'[i,j] w[i,j]`` per block plus, for thin bases, ``(1/lambda) <G_c, G_c'>``;
    differentiable in the prior precision. ``directions`` as in `predictive_precompute` (used
    when ``posterior`` is a Posterior; a cache already carries its choice).

    Examples:
        >>> import torch, flaplace
        >>> unit = lambda d: flaplace.Eigen(torch.eye(d), torch.ones(d))
        >>> factors = {"W": flaplace.KronFactor(unit(2), unit(3), torch.tensor(False))}
        >>> post = flaplace.make_posterior(factors, {"W": torch.randn(2, 3)}, prior_precision=4.0)
        >>> jac = {"W": torch.randn(5, 2, 2, 3)}
        >>> f_var = covariance_from_features(post, covariance_features(post, jac))
        >>> torch.allclose(f_var, predictive_covariance(post, jac))
        True
    """
    cache = _as_cache(posterior, directions)
    covariance: Tensor | int = 0
    for name, block in cache.blocks.items():
        flat = features.rotated[name].to(block.weights.dtype)
        covariance = covariance + (flat * block.weights.reshape(-1)) @ flat.mT
        if name in features.gram:
            covariance = covariance + block.inverse_prior * features.gram[name].to(block.weights.dtype)
    if not isinstance(covariance, Tensor):
        raise ValueError("the posterior has no blocks")
    return covariance


def linearised_predictive(
    model_fn: ModelFn,
    posterior: Posterior | PredictiveCache,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    method: JacobianMethod = "auto",
) -> tuple[Float[Tensor, "batch classes"], Float[Tensor, "batch classes classes"]]:
    """The linearised predictive ``N(f_mu, f_var)`` of the logits for one batch.

    ``f_mu = model_fn(posterior.mean, batch)`` (the logits come out of the Jacobian computation,
    evaluated one example at a time) and ``f_var = J Sigma J^T``.

    Args:
        model_fn: ``f(params, batch) -> logits (B, C)``.
        posterior: a Posterior or its `PredictiveCache` (precompute once, reuse).
        batch: the inputs.
        chunk_size: examples per vectorised Jacobian chunk (see `per_example_jacobians`).
        method: ``"auto"`` (default), ``"capture"``, ``"vmap"`` or ``"loop"`` (see
            `per_example_jacobians`). ``"auto"`` uses ``"capture"`` (one forward of the
            whole batch; works with any attention implementation of stock Hugging Face models)
            and falls back to ``"vmap"``, then ``"loop"``, when the parameters are not all weight
            matrices used once by a linear layer (e.g. biases, or a weight tied to an embedding)
            or vmap cannot trace the model: every model gets its exact Jacobians. Under
            ``torch.compile``, ``"auto"`` is ``"vmap"``.

    Returns:
        ``(f_mu (B, C), f_var (B, C, C))``, raw: not centred, in the factors' dtype (float32 for
        a posterior fitted on half-precision weights: the covariance is accumulated in it). For
        answer-token logits of a causal LM most of ``f_var`` can lie along the all-ones direction,
        which softmax ignores; the categorical links of [`flaplace.links`][flaplace.links] centre
        the moments themselves, so pass these on unchanged.

    Raises:
        ValueError: a batch with no rows, with an all-padding row, or whose logits are
            not finite (NaN/inf).

    Examples:
        >>> cache = predictive_precompute(posterior)
        >>> f_mu, f_var = linearised_predictive(f, cache, batch, chunk_size=16)
        >>> probs = flaplace.predictive_probs(f_mu, f_var, link="probit")
    """
    cache = _as_cache(posterior)
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        check_rows(batch["attention_mask"])
    jacobians, f_mu = jacobians_and_logits(model_fn, cache.mean, batch, chunk_size=chunk_size, method=method)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(f_mu).all()):
        raise ValueError(
            "non-finite (NaN/inf) logits in the batch: check the model's weights and inputs "
            "(e.g. a diverged fine-tune, or half precision overflowing)"
        )
    f_var = predictive_covariance(cache, jacobians)
    return f_mu.to(f_var.dtype), f_var
