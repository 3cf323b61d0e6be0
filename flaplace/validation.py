"""Prior precision tuning on validation NLL by gradient, through the linearised predictive.

The validation NLL of the linearised predictive,

    NLL(lambda) = -(1/N) sum_n log p_link(y_n | f_mu_n, f_var_n(lambda)),

depends on ``lambda`` only through ``f_var = J Sigma(lambda) J^T``. For one Kronecker block with
Jacobian slices ``G_c`` and ``R_c = Q_S^T G_c Q_A`` (see [`flaplace.predictive`][flaplace.predictive]),

    f_var[c, c'] = sum_ij R_c[i,j] R_c'[i,j] w_ij(lambda) + (1/lambda) <G_c, G_c'>   (thin bases)

so the rotated slices ``R`` and the Gram matrix ``<G_c, G_c'>`` are computed ONCE per validation
example, and every step of the optimiser only re-weights them: no Jacobian is recomputed. The
link must be differentiable: ``"probit"`` or ``"bridge"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.evidence import free_parameter_groups
from flaplace.jacobians import JacobianMethod, jacobians_and_logits
from flaplace.links import predictive_probs
from flaplace.params import batch_targets
from flaplace.posterior import PriorPrecision, with_prior_precision
from flaplace.predictive import (
    CovarianceFeatures,
    Directions,
    check_directions,
    covariance_features,
    covariance_from_features,
    predictive_precompute,
)
from flaplace.typing import Batch, Likelihood, ModelFn, Posterior

__all__ = ["ValidationFeatures", "tune_prior_nll", "validation_features", "validation_nll"]

DIFFERENTIABLE_LINKS: tuple[str, ...] = ("probit", "bridge")


class ValidationFeatures(NamedTuple):
    """What the validation NLL needs, independent of the prior precision.

    ``covariance``: the rotated Jacobian slices and Gram matrices of every validation example
    ([`covariance_features`][flaplace.predictive.covariance_features]); ``f_mu``: ``(N, C)`` MAP
    logits; ``labels``: ``(N,)``.
    """

    covariance: CovarianceFeatures
    f_mu: Tensor
    labels: Tensor


def validation_features(
    posterior: Posterior,
    model_fn: ModelFn,
    batches: Iterable[Batch],
    *,
    chunk_size: int | None = None,
    method: JacobianMethod = "auto",
) -> ValidationFeatures:
    """Per-example Jacobian features of the validation set that do not depend on ``lambda``.

    Examples:
        >>> features = validation_features(posterior, model_fn, val_batches)
    """
    cache = predictive_precompute(posterior)
    parts: list[CovarianceFeatures] = []
    f_mus, labels = [], []
    for batch in batches:
        jacobians, f_mu = jacobians_and_logits(
            model_fn, cache.mean, batch, chunk_size=chunk_size, method=method
        )
        parts.append(covariance_features(cache, {n: j.detach() for n, j in jacobians.items()}))
        del jacobians
        f_mus.append(f_mu.detach())
        labels.append(batch_targets(batch))
    if not f_mus:
        raise ValueError("the validation batches are empty")
    return ValidationFeatures(
        CovarianceFeatures(
            rotated={n: torch.cat([p.rotated[n] for p in parts]) for n in parts[0].rotated},
            gram={n: torch.cat([p.gram[n] for p in parts]) for n in parts[0].gram},
        ),
        f_mu=torch.cat(f_mus),
        labels=torch.cat(labels),
    )


def validation_nll(
    posterior: Posterior,
    features: ValidationFeatures,
    *,
    link: str = "probit",
    likelihood: Likelihood = "categorical",
    directions: Directions = "all",
) -> Float[Tensor, ""]:
    """Mean validation NLL of the linearised predictive, differentiable in the prior precision.

    Args:
        posterior: the posterior (its prior precision may be a tensor that requires grad).
        features: from `validation_features` (computed with the same factors).
        link: ``"probit"`` or ``"bridge"``.
        likelihood: ``"categorical"`` or ``"bernoulli"``.
        directions: the predictive's covariance, ``"all"`` (default) or ``"informed"`` (see
            [`predictive_precompute`][flaplace.predictive.predictive_precompute]).

    Examples:
        >>> features = validation_features(posterior, model_fn, val_batches)
        >>> nll = validation_nll(with_prior_precision(posterior, 10.0), features)
    """
    check_differentiable_link(link)
    f_var = covariance_from_features(posterior, features.covariance, directions)
    return labels_nll(features.f_mu.to(f_var.dtype), f_var, features.labels, link, likelihood)


def check_differentiable_link(link: str) -> None:
    """Raise a clear error for a link that the validation NLL cannot differentiate through."""
    if link not in DIFFERENTIABLE_LINKS:
        raise ValueError(f"link must be one of {DIFFERENTIABLE_LINKS} (differentiable), got {link!r}")


def labels_nll(
    f_mu: Float[Tensor, "batch classes"],
    f_var: Float[Tensor, "batch classes classes"],
    labels: Tensor,
    link: str,
    likelihood: Likelihood,
) -> Float[Tensor, ""]:
    """Mean NLL of ``labels`` under the predictive ``N(f_mu, f_var)`` through a differentiable ``link``."""
    probs = predictive_probs(f_mu, f_var, link, likelihood)  # type: ignore[arg-type]
    labels = labels.to(device=probs.device, dtype=torch.long).reshape(-1)
    picked = probs.gather(1, labels[:, None])[:, 0]
    return -picked.clamp_min(torch.finfo(probs.dtype).tiny).log().mean()


def tune_prior_nll(
    posterior: Posterior,
    model_fn: ModelFn,
    batches: Iterable[Batch],
    *,
    link: str = "probit",
    likelihood: Likelihood = "categorical",
    steps: int = 300,
    lr: float = 0.1,
    tol: float = 1e-5,
    patience: int = 20,
    decay: float = 0.9,
    betas: tuple[float, float] = (0.5, 0.9),
    init: PriorPrecision | None = None,
    per_block: bool | Sequence[str] = False,
    chunk_size: int | None = None,
    method: JacobianMethod = "auto",
    directions: Directions = "all",
    progress: bool = True,
) -> tuple[Posterior, list[dict[str, Any]]]:
    """Minimise the validation NLL of the linearised predictive over ``log lambda`` with Adam.

    Jacobian features are computed once (`validation_features`); each step costs a few
    small matrix products. Early stopping has its own tolerance: it stops when the gradient
    norm of the (mean) NLL in ``log lambda`` falls below ``tol``, or when the NLL has not
    improved by more than ``tol`` for ``patience`` steps; the best ``lambda`` seen is returned.
    Unlike the evidence, the validation NLL need not be convex in ``log lambda``, and it is flat
    where the predictive no longer changes (``lambda`` very large): start near a sensible value.

    Args:
        posterior: from [`make_posterior`][flaplace.posterior.make_posterior].
        model_fn: ``f(params, batch) -> logits``, as used to fit the factors.
        batches: validation batches with labels.
        link: ``"probit"`` or ``"bridge"``.
        likelihood: ``"categorical"`` or ``"bernoulli"``.
        steps: maximum number of Adam steps.
        lr: Adam's learning rate on ``log lambda``.
        tol: the early-stopping tolerance (on the gradient norm and on the NLL's improvement).
        patience: steps without an improvement larger than ``tol`` before stopping.
        decay: the learning rate is multiplied by ``decay`` after every step that raised the
            NLL (an overshoot), which damps Adam's oscillation around the minimum.
        betas: Adam's moment decay rates; a short first-moment memory overshoots less on this
            smooth, low-dimensional problem than torch's default ``(0.9, 0.999)``.
        init: starting prior precision; default the posterior's.
        per_block: one ``lambda`` for all blocks (``False``), one per block (``True``), or one
            per keyword group.
        chunk_size: examples per vectorised Jacobian chunk.
        method: how Jacobians are computed (see [`per_example_jacobians`][flaplace.jacobians.per_example_jacobians]).
        directions: the predictive's covariance: ``"all"`` (default, the exact Laplace
            predictive) or ``"informed"`` (see [`predictive_precompute`][flaplace.predictive.predictive_precompute]).
        progress: show a tqdm progress bar.

    Returns:
        ``(posterior, history)``: the posterior at the best prior precision found, and one record
        per step with ``step``, ``nll``, ``grad_norm`` and ``prior_precision`` (``{group: value}``).

    Examples:
        >>> tuned, history = tune_prior_nll(posterior, model_fn, val_batches, link="probit")
    """
    check_differentiable_link(link)
    if steps < 0 or patience < 1 or not (lr > 0 and tol > 0 and 0 < decay <= 1):
        raise ValueError(
            f"need steps >= 0, patience >= 1, lr > 0, tol > 0 and decay in (0, 1]; got steps={steps}, "
            f"patience={patience}, lr={lr}, tol={tol}, decay={decay}"
        )
    check_directions(directions)
    start = posterior if init is None else with_prior_precision(posterior, init)
    features = validation_features(start, model_fn, batches, chunk_size=chunk_size, method=method)
    groups = free_parameter_groups(list(start.mean), per_block)
    reference = next(iter(start.prior_precision.values()))
    initial = [
        torch.stack([start.prior_precision[n].detach().log() for n in members]).mean()
        for members in groups.values()
    ]
    log_lam = torch.stack(initial).to(dtype=reference.dtype, device=reference.device).requires_grad_(True)

    def per_name(values: Tensor) -> dict[str, Tensor]:
        return {n: values[k] for k, members in enumerate(groups.values()) for n in members}

    def objective() -> Tensor:
        posterior = with_prior_precision(start, per_name(log_lam.exp()))
        return validation_nll(posterior, features, link=link, likelihood=likelihood, directions=directions)

    def record() -> dict[str, Any]:
        return {
            "prior_precision": {key: float(v) for key, v in zip(groups, log_lam.detach().exp(), strict=True)}
        }

    (best_log_lam,), history = minimise_validation_nll(
        objective,
        [log_lam],
        record,
        steps=steps,
        lr=lr,
        betas=betas,
        tol=tol,
        patience=patience,
        decay=decay,
        progress=progress,
        desc="prior precision (validation NLL)",
    )
    return with_prior_precision(start, per_name(best_log_lam.exp())), history


def minimise_validation_nll(
    objective: Callable[[], Tensor],
    free: list[Tensor],
    record: Callable[[], dict[str, Any]],
    *,
    steps: int,
    lr: float,
    betas: tuple[float, float],
    tol: float,
    patience: int,
    decay: float,
    progress: bool,
    desc: str,
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Adam on the tensors ``free`` (which require grad) to minimise ``objective()``.

    Stops when the gradient norm falls below ``tol``, after ``patience`` steps without an
    improvement of more than ``tol``, or after ``steps`` steps; the step size is multiplied by
    ``decay`` whenever the objective goes up (an overshot minimum). Returns the values of ``free``
    at the lowest objective seen and one record per step (``step``, ``nll``, ``grad_norm`` and
    the fields of ``record()``).

    Raises:
        FloatingPointError: a non-finite objective or gradient.
    """
    optimizer = torch.optim.Adam(free, lr=lr, betas=betas)
    history: list[dict[str, Any]] = []
    best_value, best_point, since_best = math.inf, [t.detach().clone() for t in free], 0
    bar = tqdm(total=steps, disable=not progress, desc=desc)
    for step in range(steps + 1):
        value = objective()
        grads = torch.autograd.grad(value, free)
        grad_norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
        current = float(value.detach())
        if not (math.isfinite(current) and math.isfinite(grad_norm)):
            bar.close()
            raise FloatingPointError(f"the validation NLL or its gradient is not finite at step {step}")
        history.append({"step": step, "nll": current, "grad_norm": grad_norm, **record()})
        improved = current < best_value - tol
        if current < best_value:
            best_value, best_point = current, [t.detach().clone() for t in free]
        since_best = 0 if improved else since_best + 1
        if grad_norm < tol or since_best >= patience or step == steps:
            break
        if len(history) > 1 and current > history[-2]["nll"]:
            for group in optimizer.param_groups:  # overshot the minimum: damp the steps
                group["lr"] *= decay
        optimizer.zero_grad()
        for tensor, grad in zip(free, grads, strict=True):
            tensor.grad = grad
        optimizer.step()
        bar.update(1)
        bar.set_postfix(nll=f"{current:.4g}", grad=f"{grad_norm:.2e}")
    bar.close()
    return best_point, history
