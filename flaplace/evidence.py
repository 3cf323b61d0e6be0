"""Laplace log marginal likelihood (the evidence) and prior precision tuning.

Per block, with posterior precision ``P = S (x) A + lambda I`` and prior precision
``P0 = lambda I`` (the Conventions page of the docs),

    log Z = LL(theta*) - sum_blocks [ (lambda/2) ||theta* - m||^2 + 1/2 sum_{i,j} log(1 + s_i a_j / lambda) ]

with ``m`` the prior mean (``posterior.prior_mean``; zero when it is ``None``), which equals
``LL - 1/2 (theta* - m)^T P0 (theta* - m) - 1/2 (logdet P - logdet P0)``: the eigenvalues of
``P`` are ``s_i a_j + lambda`` on the span of the eigenbases and ``lambda`` elsewhere, where
they cancel against ``P0``. Eigenvalues that round-off made slightly negative are clamped at 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.posterior import (
    PriorPrecision,
    assign_blocks,
    num_parameters,
    with_prior_precision,
)
from flaplace.posterior_io import validate_posterior
from flaplace.typing import Posterior

#: Default grid of prior precisions for `tune_prior_grid`: ``10^-4 ... 10^4``, 4 per decade.
DEFAULT_GRID: tuple[float, ...] = tuple(10.0 ** (k / 4) for k in range(-16, 17))


def log_marginal_likelihood(posterior: Posterior, log_likelihood: Tensor | float) -> Float[Tensor, ""]:
    """The Laplace log marginal likelihood ``log Z`` (the 2 pi terms cancel).

    Args:
        posterior: from [`make_posterior`][flaplace.posterior.make_posterior]; full or thin factors.
        log_likelihood: ``LL(theta*)``, the log-likelihood of the training data at the
            MAP, SUMMED over examples (the normalisation of the factors: S sums over the data).

    The prior term is ``(lambda/2) ||theta* - m||^2`` with ``m = posterior.prior_mean`` (zero
    when ``None``): a prior centred at the adapters' initialisation charges only the distance
    the data moved the weights.

    Returns:
        A 0-d tensor in the dtype of the prior precision, differentiable in the
        prior precision tensors (and so in ``log lambda``).

    Raises:
        ValueError: a posterior that fails [`validate_posterior`][flaplace.posterior_io.validate_posterior]
            (e.g. a NaN or non-positive prior precision), or a log-likelihood that is not
            finite (NaN from K-FAC batches without labels: the message says so).

    Examples:
        >>> posterior = make_posterior(factors, params, 1.0)
        >>> log_z = log_marginal_likelihood(posterior, log_likelihood=-1234.5)
    """
    if not torch.compiler.is_compiling():
        validate_posterior(posterior, values=False)
    reference = next(iter(posterior.prior_precision.values()))
    if isinstance(log_likelihood, Tensor):
        if log_likelihood.numel() != 1:
            raise ValueError(
                f"log_likelihood must be a single number, got shape {tuple(log_likelihood.shape)}"
            )
        total = log_likelihood.to(dtype=reference.dtype, device=reference.device).reshape(())
    else:
        total = torch.tensor(float(log_likelihood), dtype=reference.dtype, device=reference.device)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(total.detach())):
        raise ValueError(_not_finite_log_likelihood(float(total.detach())))
    for name in posterior.mean:
        lam = posterior.prior_precision[name]
        factor = posterior.factors[name]
        s = factor.S.values.clamp(min=0).to(lam.dtype)
        a = factor.A.values.clamp(min=0).to(lam.dtype)
        squared_norm = prior_distance(posterior, name, lam.dtype)
        log_det_ratio = torch.log1p(s[:, None] * a[None, :] / lam).sum()
        total = total - 0.5 * lam * squared_norm - 0.5 * log_det_ratio
    return total


def prior_distance(posterior: Posterior, name: str, dtype: torch.dtype | None = None) -> Float[Tensor, ""]:
    """``||theta* - m||^2`` of one block: the squared distance of the MAP from the prior mean.

    ``m`` is ``posterior.prior_mean[name]``, or zero when the posterior has no prior mean.

    Examples:
        >>> import torch
        >>> from flaplace.typing import Eigen, KronFactor
        >>> unit = Eigen(torch.eye(2), torch.zeros(2))
        >>> factors = {"W": KronFactor(unit, unit, torch.tensor(False))}
        >>> post = make_posterior(factors, {"W": torch.ones(2, 2)}, 1.0)
        >>> float(prior_distance(post, "W"))
        4.0
        >>> float(prior_distance(post._replace(prior_mean={"W": torch.ones(2, 2)}), "W"))
        0.0
    """
    mean = posterior.mean[name]
    dtype = mean.dtype if dtype is None else dtype
    delta = mean.to(dtype)
    if posterior.prior_mean is not None:
        delta = delta - posterior.prior_mean[name].to(device=mean.device, dtype=dtype)
    return delta.square().sum()


def _not_finite_log_likelihood(value: float) -> str:
    hint = (
        "; K-FAC's state.log_likelihood is NaN when its batches had no 'labels': the evidence needs "
        "the log-likelihood of the labelled training data, so fit K-FAC on batches with labels"
        if math.isnan(value)
        else ""
    )
    return f"log_likelihood must be finite, got {value}{hint}"


def free_parameter_groups(names: Sequence[str], per_block: bool | Sequence[str]) -> dict[str, list[str]]:
    """Which blocks share each tuned prior precision: ``{group: [block names]}``.

    Examples:
        >>> free_parameter_groups(["a.lora_A", "a.lora_B"], per_block=False)
        {'all': ['a.lora_A', 'a.lora_B']}
        >>> free_parameter_groups(["a.lora_A", "a.lora_B"], per_block=True)
        {'a.lora_A': ['a.lora_A'], 'a.lora_B': ['a.lora_B']}
    """
    if per_block is True:
        return {name: [name] for name in names}
    if per_block is False:
        return {"all": list(names)}
    if isinstance(per_block, str):
        per_block = [per_block]
    owner = assign_blocks(names, per_block)
    return {key: [n for n in names if owner[n] == key] for key in per_block}


def tune_prior_evidence(
    posterior: Posterior,
    log_likelihood: Tensor | float,
    *,
    steps: int = 1000,
    lr: float = 0.1,
    init: PriorPrecision | None = None,
    per_block: bool | Sequence[str] = False,
    progress: bool = True,
    tol: float = 1e-6,
    betas: tuple[float, float] = (0.5, 0.9),
    decay: float = 0.9,
    method: str = "gradient",
) -> tuple[Posterior, list[dict[str, Any]]]:
    """Maximise the evidence over the prior precision: Adam on ``log lambda``, or MacKay's update.

    ``log Z`` is concave in ``log lambda`` (one term is ``-(c/2) e^t``, the others
    ``-1/2 softplus(log(s a) - t)``), so its stationary point is the maximum. With the prior
    mean ``m`` (``posterior.prior_mean``, zero when ``None``), that point satisfies, per tuned group,

        lambda = gamma / ||theta* - m||^2,    gamma = sum_{i,j} s_i a_j / (s_i a_j + lambda),

    ``gamma`` being the effective number of weights the data determine. ``method="fixed-point"``
    iterates this equation (MacKay's update, as in Antoran et al. 2022's linearised Laplace)
    instead of taking Adam steps; both stop at the same gradient test and reach the same optimum.

    Args:
        posterior: from [`make_posterior`][flaplace.posterior.make_posterior].
        log_likelihood: ``LL(theta*)`` summed over the training data.
        steps: maximum number of Adam steps.
        lr: Adam's learning rate on ``log lambda``.
        init: starting prior precision (as for ``make_posterior``); default: the
            posterior's own. Blocks that share a tuned value start at the
            geometric mean of their initial values.
        per_block: ``False``: one ``lambda`` for all blocks; ``True``: one per
            block; a sequence of case-insensitive keywords (e.g. ``["lora_A",
            "lora_B"]``): one per group, every block in exactly one group.
        progress: show a tqdm progress bar.
        tol: stop when the gradient norm of ``log Z`` with respect to the tuned
            ``log lambda`` values falls below ``tol`` times the number of weights
            ``D`` the posterior covers. The gradient is a sum of one term per weight
            (each at most 1/2 in size near the optimum) and so is the curvature,
            so this makes ``tol`` roughly the accuracy reached in ``log lambda``
            whatever the model's size.
        betas: Adam's moment decay rates. Shorter memories than torch's default
            ``(0.9, 0.999)`` converge in far fewer steps on this smooth, concave,
            low-dimensional problem (a few hundred steps from ``lambda`` six decades off).
        decay: the learning rate is multiplied by ``decay`` after every step that
            lowered ``log Z``: an overshoot of the concave maximum. This damps the
            limit cycles Adam's normalised steps can fall into near the optimum.
        method: ``"gradient"`` (Adam on ``log lambda``; ``lr``, ``betas`` and ``decay`` apply)
            or ``"fixed-point"`` (``lambda <- gamma / ||theta* - m||^2`` per group; ``steps``
            counts its iterations).

    Returns:
        ``(posterior, history)``: the posterior with the tuned (detached) prior
        precision, and one record per evaluation with ``step``, ``log_evidence``,
        ``grad_norm`` and ``prior_precision`` (``{group: value}``; the group is
        ``"all"`` for a shared value). A warning is raised when ``steps`` ran
        out before the gradient fell below ``tol``.

    Examples:
        >>> tuned, history = tune_prior_evidence(posterior, ll, per_block=["lora_A", "lora_B"])  # doctest: +SKIP
        >>> last = history[-1]  # doctest: +SKIP
        >>> last["log_evidence"], last["prior_precision"]  # doctest: +SKIP
        >>> by_mackay, _ = tune_prior_evidence(posterior, ll, method="fixed-point", progress=False)
        >>> by_adam, _ = tune_prior_evidence(posterior, ll, progress=False)
        >>> a, b = (float(p.prior_precision[name]) for p in (by_mackay, by_adam))
        >>> abs(a - b) / b < 1e-3
        True
    """
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if method not in ("gradient", "fixed-point"):
        raise ValueError(f"method must be 'gradient' or 'fixed-point', got {method!r}")
    if not (lr > 0 and tol > 0 and 0 < decay <= 1):
        raise ValueError(
            f"lr and tol must be positive and decay in (0, 1]; got lr={lr}, tol={tol}, decay={decay}"
        )
    validate_posterior(posterior)
    single = not isinstance(log_likelihood, Tensor) or log_likelihood.numel() == 1
    if single and not math.isfinite(float(log_likelihood)):
        raise ValueError(_not_finite_log_likelihood(float(log_likelihood)))
    names = list(posterior.mean)
    start = posterior if init is None else with_prior_precision(posterior, init)
    groups = free_parameter_groups(names, per_block)
    reference = next(iter(start.prior_precision.values()))
    initial = [
        torch.stack([start.prior_precision[n].detach().log() for n in members]).mean()
        for members in groups.values()
    ]
    log_lam = torch.stack(initial).to(dtype=reference.dtype, device=reference.device).requires_grad_(True)
    optimizer = torch.optim.Adam([log_lam], lr=lr, betas=betas)
    threshold = tol * num_parameters(posterior)

    def evidence_and_gradient() -> tuple[Tensor, Tensor]:
        precisions = {key: log_lam[k].exp() for k, key in enumerate(groups)}
        per_name = {n: precisions[key] for key, members in groups.items() for n in members}
        log_z = log_marginal_likelihood(with_prior_precision(start, per_name), log_likelihood)
        (grad,) = torch.autograd.grad(log_z, log_lam)
        return log_z.detach(), grad

    def fixed_point_update() -> None:
        """``log lambda <- log gamma - log ||theta* - m||^2`` for every group, in place."""
        with torch.no_grad():
            for k, members in enumerate(groups.values()):
                lam = log_lam[k].exp()
                gamma = log_lam.new_zeros(())
                distance = log_lam.new_zeros(())
                for n in members:
                    factor = start.factors[n]
                    eig = (
                        factor.S.values.clamp(min=0).to(lam.dtype)[:, None]
                        * factor.A.values.clamp(min=0).to(lam.dtype)[None, :]
                    )
                    gamma = gamma + (eig / (eig + lam)).sum()
                    distance = distance + prior_distance(start, n, lam.dtype)
                if not bool(distance > 0) or not bool(gamma > 0):
                    raise ValueError(
                        "method='fixed-point' needs a MAP away from the prior mean and some curvature in "
                        f"every group; group {list(groups)[k]!r} has ||theta* - m||^2 = {float(distance):.3g} "
                        f"and gamma = {float(gamma):.3g}; use method='gradient'"
                    )
                log_lam[k] = gamma.log() - distance.log()

    history: list[dict[str, Any]] = []
    converged = False
    bar = tqdm(total=steps, disable=not progress, desc="prior precision (evidence)")
    for step in range(steps + 1):
        log_z, grad = evidence_and_gradient()
        grad_norm = float(grad.norm())
        values = log_lam.detach().exp()
        history.append(
            {
                "step": step,
                "log_evidence": float(log_z),
                "grad_norm": grad_norm,
                "prior_precision": {key: float(values[k]) for k, key in enumerate(groups)},
            }
        )
        if not math.isfinite(grad_norm):
            bar.close()
            raise FloatingPointError(f"the evidence gradient is not finite at step {step}")
        if grad_norm < threshold:
            converged = True
            break
        if step == steps:
            break
        if method == "fixed-point":
            fixed_point_update()
            bar.update(1)
            bar.set_postfix(log_evidence=f"{float(log_z):.4g}", grad=f"{grad_norm:.2e}")
            continue
        if len(history) > 1 and history[-1]["log_evidence"] < history[-2]["log_evidence"]:
            for group in optimizer.param_groups:  # overshot the (concave) maximum: damp the steps
                group["lr"] *= decay
        optimizer.zero_grad()
        log_lam.grad = -grad  # Adam minimises -log Z
        optimizer.step()
        bar.update(1)
        bar.set_postfix(log_evidence=f"{float(log_z):.4g}", grad=f"{grad_norm:.2e}")
    bar.close()
    if not converged:
        warnings.warn(
            f"tune_prior_evidence: gradient norm {history[-1]['grad_norm']:.3g} is still above "
            f"{threshold:.3g} (tol={tol} times {num_parameters(posterior)} weights) after {steps} steps; "
            "raise steps or lr",
            RuntimeWarning,
            stacklevel=2,
        )
    final = log_lam.detach().exp()
    tuned = {n: final[k] for k, members in enumerate(groups.values()) for n in members}
    return with_prior_precision(start, tuned), history


def tune_prior_grid(
    posterior: Posterior,
    nll_fn: Callable[[Posterior], float | Tensor],
    grid: Sequence[float] | Tensor | None = None,
    progress: bool = True,
) -> tuple[Posterior, list[dict[str, float]]]:
    """Choose one prior precision for all blocks by the lowest validation NLL on a grid.

    Args:
        posterior: from [`make_posterior`][flaplace.posterior.make_posterior].
        nll_fn: evaluates a candidate posterior, e.g. the mean negative log
            predictive probability on a validation set.
        grid: candidate prior precisions (positive); default `DEFAULT_GRID`
            (``10^-4 ... 10^4``, four per decade).
        progress: show a tqdm progress bar.

    Returns:
        ``(posterior, table)``: the posterior with the best prior precision (the
        first of tied minima), and one ``{"prior_precision", "nll"}`` record per
        candidate. Candidates whose NLL is not finite are recorded but never chosen.

    Raises:
        ValueError: an empty or non-positive grid, or no candidate with a finite NLL.

    Examples:
        >>> tuned, table = tune_prior_grid(posterior, lambda p: validation_nll(p, val_loader))  # doctest: +SKIP
    """
    candidates = DEFAULT_GRID if grid is None else [float(g) for g in grid]
    if len(candidates) == 0:
        raise ValueError("the grid of prior precisions is empty")
    if not all(math.isfinite(g) and g > 0 for g in candidates):
        raise ValueError(f"grid values must be positive and finite, got {list(candidates)}")
    table: list[dict[str, float]] = []
    best: tuple[float, float] | None = None
    for value in tqdm(candidates, disable=not progress, desc="prior precision (grid)"):
        nll_value = float(nll_fn(with_prior_precision(posterior, value)))
        table.append({"prior_precision": value, "nll": nll_value})
        if math.isfinite(nll_value) and (best is None or nll_value < best[1]):
            best = (value, nll_value)
    if best is None:
        raise ValueError("no prior precision on the grid gave a finite NLL")
    return with_prior_precision(posterior, best[0]), table


def evidence_gradient(posterior: Posterior, log_likelihood: Tensor | float) -> dict[str, float]:
    """``d log Z / d log lambda`` for each block at the posterior's prior precision.

    Examples:
        >>> gradient = evidence_gradient(posterior, ll)  # ~0 for every block after per-block tuning
    """
    names = list(posterior.mean)
    log_lams = {n: posterior.prior_precision[n].detach().log().requires_grad_(True) for n in names}
    log_z = log_marginal_likelihood(
        with_prior_precision(posterior, {n: v.exp() for n, v in log_lams.items()}), log_likelihood
    )
    grads = torch.autograd.grad(log_z, list(log_lams.values()))
    return {n: float(g) for n, g in zip(names, grads, strict=True)}
