"""A likelihood temperature: ``p(y | f) = softmax(f / T)``, in the evidence and on validation data.

The temperature ``T`` is a hyperparameter of the likelihood, as the noise scale is for a
Gaussian likelihood. It changes both parts of the Laplace evidence:

* the log-likelihood, ``LL_T = sum_n log softmax(f_n / T)[y_n]``;
* the curvature: the Hessian of ``-log softmax(f / T)[y]`` in ``f`` is ``Lambda(f / T) / T^2``, so
  the GGN of the tempered model is ``J^T Lambda(f / T) J / T^2``.

Both come out of the existing functions unchanged when the model function's logits are divided
by ``T`` (`TemperedModelFunction`): K-FAC then pulls back cotangents of ``softmax(f / T)``
(``exact``, ``mc``) through ``f / T``, which multiplies every output gradient by ``1 / T``, and
the log-likelihood K-FAC records is that of the tempered likelihood. ``T = 1`` is the untempered
model exactly (division by 1 changes no bit).

The factors depend on ``T`` (through ``Lambda(f / T)``), so each temperature needs its own K-FAC
pass over the training data; the prior precision is then tuned at that temperature (cheap).
[`tune_evidence_temperature`][flaplace.temperature.tune_evidence_temperature] does this on a grid of
temperatures and refines the best one by a golden-section search in ``log T``.

With validation data, [`tune_prior_temperature_nll`][flaplace.temperature.tune_prior_temperature_nll]
fits ``(lambda, T)`` jointly on the validation NLL of the linearised predictive with the logits
divided by ``T``: mean ``f_mu / T`` and covariance ``f_var / T^2``. The posterior's factors are
kept as given, so the validation Jacobians are computed once and every optimiser step only
re-weights them. As ``lambda -> infinity`` the covariance vanishes and the family is temperature
scaling of the MAP; at ``T = 1`` it is the validation NLL of
[`tune_prior_nll`][flaplace.validation.tune_prior_nll].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.evidence import free_parameter_groups, tune_prior_evidence
from flaplace.jacobians import JacobianMethod
from flaplace.kfac import fit as fit_kfac
from flaplace.links import predictive_probs
from flaplace.posterior import PriorPrecision, make_posterior, with_prior_precision
from flaplace.predictive import covariance_from_features
from flaplace.typing import Batch, Likelihood, ModelFn, Params, Posterior
from flaplace.validation import DIFFERENTIABLE_LINKS, ValidationFeatures, validation_features

__all__ = [
    "DEFAULT_TEMPERATURES",
    "EvidenceAtTemperature",
    "TemperedModelFunction",
    "evidence_at_temperature",
    "tempered_moments",
    "tune_evidence_temperature",
    "tune_prior_temperature_nll",
    "validation_nll_tempered",
]

#: Default grid of temperatures for `tune_evidence_temperature`: ``2^-2 ... 2^3``, two per octave.
DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 7))


def _check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"the temperature must be positive and finite, got {temperature}")
    return value


class TemperedModelFunction:
    """``f(params, batch) / T``: a model function whose likelihood is ``softmax(f / T)``.

    Every function of flaplace that takes a model function applies to the tempered likelihood
    through this wrapper: K-FAC (`build`, `fit_kfac`) gets the tempered GGN
    ``J^T Lambda(f / T) J / T^2`` and the tempered log-likelihood, the linearised predictive the
    moments ``(f_mu / T, f_var / T^2)``. Attributes of the wrapped function (``transposed``,
    ``names``, ...) are read through, so the wrapper can stand in for a
    [`ModelFunction`][flaplace.params.ModelFunction].

    Args:
        model_fn: ``f(params, batch) -> logits``.
        temperature: ``T > 0``; ``T = 1`` returns the logits unchanged.

    Raises:
        ValueError: a temperature that is not positive and finite.

    Examples:
        >>> import torch
        >>> def f(params, batch):
        ...     return batch[0] @ params["w"].T
        >>> hot = TemperedModelFunction(f, 2.0)
        >>> hot({"w": torch.ones(2, 3)}, (torch.ones(1, 3),))
        tensor([[1.5000, 1.5000]])
    """

    def __init__(self, model_fn: ModelFn, temperature: float):
        self.model_fn = model_fn
        self.temperature = _check_temperature(temperature)

    def __call__(self, params: Params, batch: Batch) -> Tensor:
        logits = self.model_fn(params, batch)
        return logits if self.temperature == 1.0 else logits / self.temperature

    def __getattr__(self, name: str) -> Any:
        if name in ("model_fn", "temperature"):  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.model_fn, name)


def tempered_moments(
    f_mu: Float[Tensor, "batch classes"],
    f_var: Float[Tensor, "batch classes classes"],
    temperature: float | Tensor,
) -> tuple[Float[Tensor, "batch classes"], Float[Tensor, "batch classes classes"]]:
    """The logit predictive of ``f / T`` from that of ``f``: ``(f_mu / T, f_var / T^2)``.

    Differentiable in a tensor ``temperature``. Pass the result to
    [`predictive_probs`][flaplace.links.predictive_probs].

    Examples:
        >>> import torch
        >>> mu, var = tempered_moments(torch.ones(1, 2), torch.eye(2)[None], 2.0)
        >>> mu, var[0, 0, 0]
        (tensor([[0.5000, 0.5000]]), tensor(0.2500))
    """
    return f_mu / temperature, f_var / temperature**2


class EvidenceAtTemperature(NamedTuple):
    """The evidence-tuned posterior of the tempered likelihood at one temperature.

    ``posterior``: built from the factors of ``f / T`` with the prior precision that maximises
    the evidence at this temperature; ``log_likelihood``: ``LL_T`` summed over the training
    data; ``log_evidence``: ``log Z(lambda*, T)``.
    """

    temperature: float
    posterior: Posterior
    log_likelihood: Tensor
    log_evidence: float


def evidence_at_temperature(
    model_fn: ModelFn,
    params: Params,
    batches: Iterable[Batch],
    temperature: float = 1.0,
    *,
    prior_precision: PriorPrecision = 1.0,
    prior_mean: Params | None = None,
    per_block: bool | Sequence[str] = False,
    tune_options: dict[str, Any] | None = None,
    progress: bool = False,
    **kfac_options: Any,
) -> EvidenceAtTemperature:
    """K-FAC of the tempered likelihood, then the prior precision that maximises its evidence.

    Args:
        model_fn: ``f(params, batch) -> logits`` (untempered).
        params: the MAP adapter weights.
        batches: the training data (any iterable; read once).
        temperature: ``T``; ``1.0`` gives exactly `fit_kfac` and `tune_prior_evidence` on ``f``.
        prior_precision: where the tuning of ``lambda`` starts.
        prior_mean: the prior's centre (see [`make_posterior`][flaplace.posterior.make_posterior]).
        per_block: one ``lambda`` (``False``), one per block (``True``) or one per keyword group.
        tune_options: passed to [`tune_prior_evidence`][flaplace.evidence.tune_prior_evidence]
            (``steps``, ``lr``, ``tol``, ``method``, ...).
        progress: show progress bars.
        **kfac_options: passed to [`fit_kfac`][flaplace.kfac.fit] (``fisher``, ``sharing``, ...).

    Returns:
        An [`EvidenceAtTemperature`][flaplace.temperature.EvidenceAtTemperature].

    Examples:
        >>> result = evidence_at_temperature(model_fn, params, train_batches, 2.0, fisher="exact")
        >>> result.log_evidence, result.posterior.prior_precision  # doctest: +SKIP
    """
    tempered = TemperedModelFunction(model_fn, temperature)
    factors, state = fit_kfac(tempered, params, batches, progress=progress, **kfac_options)
    posterior = make_posterior(factors, params, prior_precision, prior_mean=prior_mean)
    tuned, history = tune_prior_evidence(
        posterior, state.log_likelihood, per_block=per_block, progress=progress, **(tune_options or {})
    )
    return EvidenceAtTemperature(
        tempered.temperature, tuned, state.log_likelihood, float(history[-1]["log_evidence"])
    )


#: The golden ratio's conjugate, ``(sqrt 5 - 1) / 2``: the golden-section search's step.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def tune_evidence_temperature(
    model_fn: ModelFn,
    params: Params,
    batches: Iterable[Batch],
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    refine_steps: int = 8,
    prior_precision: PriorPrecision = 1.0,
    prior_mean: Params | None = None,
    per_block: bool | Sequence[str] = False,
    tune_options: dict[str, Any] | None = None,
    progress: bool = True,
    **kfac_options: Any,
) -> tuple[EvidenceAtTemperature, list[dict[str, Any]]]:
    """Maximise the evidence over the prior precision and a likelihood temperature jointly.

    For each temperature ``T`` of the grid the factors of ``f / T`` are fitted and ``lambda`` is
    tuned (`evidence_at_temperature`): that gives the profile ``max_lambda log Z(lambda, T)``.
    The best grid point is then refined by ``refine_steps`` golden-section steps in ``log T``
    between its neighbours on the grid (assuming one maximum there). Each evaluation is one
    K-FAC pass over ``batches``, so ``batches`` must be re-iterable (a list or a DataLoader).

    Args:
        model_fn: ``f(params, batch) -> logits`` (untempered).
        params: the MAP adapter weights.
        batches: the training data, read once per evaluated temperature.
        temperatures: the grid (positive); include ``1.0`` to compare with the untempered model.
        refine_steps: golden-section steps after the grid (0: the grid's best only); each
            step narrows the bracket by the factor 0.618 and costs one evaluation.
        prior_precision: where each tuning of ``lambda`` starts.
        prior_mean: the prior's centre.
        per_block: one ``lambda`` (``False``), one per block (``True``) or per keyword group.
        tune_options: passed to [`tune_prior_evidence`][flaplace.evidence.tune_prior_evidence].
        progress: show a progress bar over the evaluations.
        **kfac_options: passed to [`fit_kfac`][flaplace.kfac.fit].

    Returns:
        ``(best, table)``: the [`EvidenceAtTemperature`][flaplace.temperature.EvidenceAtTemperature]
        with the highest evidence, and one record per evaluation (``temperature``,
        ``log_evidence``, ``prior_precision`` as ``{block: value}``, ``log_likelihood``).

    Raises:
        ValueError: an empty grid, a non-positive temperature, or ``refine_steps < 0``.

    Examples:
        >>> best, table = tune_evidence_temperature(model_fn, params, train_batches, fisher="exact")
        >>> best.temperature, best.posterior  # doctest: +SKIP
    """
    grid = sorted(_check_temperature(t) for t in temperatures)
    if not grid:
        raise ValueError("the grid of temperatures is empty")
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be non-negative, got {refine_steps}")
    table: list[dict[str, Any]] = []
    cache: dict[float, EvidenceAtTemperature] = {}
    bar = tqdm(total=len(grid) + refine_steps, disable=not progress, desc="evidence over temperature")

    def evaluate(temperature: float) -> float:
        if temperature not in cache:
            result = evidence_at_temperature(
                model_fn,
                params,
                batches,
                temperature,
                prior_precision=prior_precision,
                prior_mean=prior_mean,
                per_block=per_block,
                tune_options=tune_options,
                **kfac_options,
            )
            cache[temperature] = result
            table.append(
                {
                    "temperature": temperature,
                    "log_evidence": result.log_evidence,
                    "log_likelihood": float(result.log_likelihood),
                    "prior_precision": {n: float(v) for n, v in result.posterior.prior_precision.items()},
                }
            )
            bar.update(1)
        return cache[temperature].log_evidence

    values = [evaluate(t) for t in grid]
    best = max(range(len(grid)), key=values.__getitem__)
    if refine_steps and len(grid) > 1:
        low = math.log(grid[max(best - 1, 0)])
        high = math.log(grid[min(best + 1, len(grid) - 1)])
        inner_low = high - _GOLDEN * (high - low)
        inner_high = low + _GOLDEN * (high - low)
        value_low, value_high = evaluate(math.exp(inner_low)), evaluate(math.exp(inner_high))
        for _ in range(refine_steps - 2):
            if value_low >= value_high:  # the maximum is in [low, inner_high]
                high, inner_high, value_high = inner_high, inner_low, value_low
                inner_low = high - _GOLDEN * (high - low)
                value_low = evaluate(math.exp(inner_low))
            else:
                low, inner_low, value_low = inner_low, inner_high, value_high
                inner_high = low + _GOLDEN * (high - low)
                value_high = evaluate(math.exp(inner_high))
    bar.close()
    winner = max(cache.values(), key=lambda r: r.log_evidence)
    return winner, table


def validation_nll_tempered(
    posterior: Posterior,
    features: ValidationFeatures,
    temperature: float | Tensor = 1.0,
    *,
    link: str = "probit",
    likelihood: Likelihood = "categorical",
) -> Float[Tensor, ""]:
    """Mean validation NLL of the linearised predictive with the logits divided by ``T``.

    The predictive is ``N(f_mu / T, f_var / T^2)`` through ``link``; differentiable in the prior
    precision and in a tensor ``temperature``. At ``T = 1`` it equals
    [`validation_nll`][flaplace.validation.validation_nll].

    Args:
        posterior: the posterior (its prior precision may require grad).
        features: from [`validation_features`][flaplace.validation.validation_features].
        temperature: ``T``, a float or a 0-d tensor.
        link: ``"probit"`` or ``"bridge"``.
        likelihood: ``"categorical"`` or ``"bernoulli"``.

    Examples:
        >>> features = validation_features(posterior, model_fn, val_batches)  # doctest: +SKIP
        >>> nll = validation_nll_tempered(posterior, features, 1.5)  # doctest: +SKIP
    """
    if link not in DIFFERENTIABLE_LINKS:
        raise ValueError(f"link must be one of {DIFFERENTIABLE_LINKS} (differentiable), got {link!r}")
    f_var = covariance_from_features(posterior, features.covariance)
    f_mu, f_var = tempered_moments(features.f_mu.to(f_var.dtype), f_var, temperature)
    probs = predictive_probs(f_mu, f_var, link, likelihood)  # type: ignore[arg-type]
    labels = features.labels.to(device=probs.device, dtype=torch.long).reshape(-1)
    picked = probs.gather(1, labels[:, None])[:, 0]
    return -picked.clamp_min(torch.finfo(probs.dtype).tiny).log().mean()


def tune_prior_temperature_nll(
    posterior: Posterior,
    model_fn: ModelFn,
    batches: Iterable[Batch],
    *,
    link: str = "probit",
    likelihood: Likelihood = "categorical",
    temperature: float = 1.0,
    tune_prior: bool = True,
    tune_temperature: bool = True,
    steps: int = 500,
    lr: float = 0.05,
    tol: float = 1e-6,
    patience: int = 30,
    betas: tuple[float, float] = (0.5, 0.9),
    decay: float = 0.9,
    init: PriorPrecision | None = None,
    per_block: bool | Sequence[str] = False,
    chunk_size: int | None = None,
    method: JacobianMethod = "auto",
    progress: bool = True,
) -> tuple[Posterior, float, list[dict[str, Any]]]:
    """Fit the prior precision and a temperature jointly on the validation NLL (Adam on the logs).

    The model is the linearised predictive ``N(f_mu / T, f_var(lambda) / T^2)`` of the given
    posterior (its factors are not refitted per ``T``: `validation_nll_tempered`). The Jacobian
    features are computed once; each step costs a few small matrix products. It contains
    temperature scaling of the MAP (``lambda -> infinity``) and the prior tuning of
    [`tune_prior_nll`][flaplace.validation.tune_prior_nll] (``T = 1``), so its validation NLL is
    at most theirs up to the optimiser's tolerance. Start ``lambda`` (``init``) where the
    predictive still changes with it: the NLL is flat for very large ``lambda``.

    Args:
        posterior: from [`make_posterior`][flaplace.posterior.make_posterior].
        model_fn: ``f(params, batch) -> logits`` (untempered), as used to fit the factors.
        batches: validation batches with labels.
        link: ``"probit"`` or ``"bridge"``.
        likelihood: ``"categorical"`` or ``"bernoulli"``.
        temperature: the starting temperature (or the fixed one with ``tune_temperature=False``).
        tune_prior: tune ``lambda`` (``False``: keep the posterior's, or ``init``).
        tune_temperature: tune ``T`` (``False``: keep ``temperature``).
        steps: maximum number of Adam steps.
        lr: Adam's learning rate on ``(log lambda, log T)``.
        tol: stop when the gradient norm falls below ``tol``, or when the NLL has not improved
            by more than ``tol`` for ``patience`` steps; the best point seen is returned.
        patience: see ``tol``.
        betas: Adam's moment decay rates.
        decay: the learning rate is multiplied by ``decay`` after every step that raised the NLL.
        init: starting prior precision; default the posterior's.
        per_block: one ``lambda`` (``False``), one per block (``True``) or one per keyword group.
        chunk_size: examples per vectorised Jacobian chunk.
        method: how Jacobians are computed.
        progress: show a progress bar.

    Returns:
        ``(posterior, temperature, history)``: the posterior at the best prior precision, the best
        temperature, and one record per step (``step``, ``nll``, ``grad_norm``,
        ``prior_precision`` as ``{group: value}``, ``temperature``).

    Raises:
        ValueError: nothing to tune, a non-differentiable link, or bad optimiser settings.

    Examples:
        >>> tuned, T, history = tune_prior_temperature_nll(posterior, model_fn, val_batches)  # doctest: +SKIP
        >>> f_mu, f_var = linearised_predictive(model_fn, tuned, test_batch)  # doctest: +SKIP
        >>> probs = predictive_probs(*tempered_moments(f_mu, f_var, T))  # doctest: +SKIP
    """
    if link not in DIFFERENTIABLE_LINKS:
        raise ValueError(f"link must be one of {DIFFERENTIABLE_LINKS} (differentiable), got {link!r}")
    if not (tune_prior or tune_temperature):
        raise ValueError("nothing to tune: set tune_prior or tune_temperature")
    if steps < 0 or patience < 1 or not (lr > 0 and tol > 0 and 0 < decay <= 1):
        raise ValueError(
            f"need steps >= 0, patience >= 1, lr > 0, tol > 0 and decay in (0, 1]; got steps={steps}, "
            f"patience={patience}, lr={lr}, tol={tol}, decay={decay}"
        )
    start = posterior if init is None else with_prior_precision(posterior, init)
    features = validation_features(start, model_fn, batches, chunk_size=chunk_size, method=method)
    groups = free_parameter_groups(list(start.mean), per_block)
    reference = next(iter(start.prior_precision.values()))
    log_lam = torch.stack(
        [
            torch.stack([start.prior_precision[n].detach().log() for n in members]).mean()
            for members in groups.values()
        ]
    ).to(dtype=reference.dtype, device=reference.device)
    log_t = torch.tensor(
        math.log(_check_temperature(temperature)), dtype=reference.dtype, device=reference.device
    )
    free = [t.requires_grad_(True) for t, on in ((log_lam, tune_prior), (log_t, tune_temperature)) if on]
    optimizer = torch.optim.Adam(free, lr=lr, betas=betas)

    def per_name(values: Tensor) -> dict[str, Tensor]:
        return {n: values[k] for k, members in enumerate(groups.values()) for n in members}

    history: list[dict[str, Any]] = []
    best_value, best_point, since_best = math.inf, (log_lam.detach().clone(), log_t.detach().clone()), 0
    bar = tqdm(total=steps, disable=not progress, desc="prior precision and temperature (validation NLL)")
    for step in range(steps + 1):
        value = validation_nll_tempered(
            with_prior_precision(start, per_name(log_lam.exp())),
            features,
            log_t.exp(),
            link=link,
            likelihood=likelihood,
        )
        grads = torch.autograd.grad(value, free)
        grad_norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
        current = float(value.detach())
        if not (math.isfinite(current) and math.isfinite(grad_norm)):
            bar.close()
            raise FloatingPointError(f"the validation NLL or its gradient is not finite at step {step}")
        history.append(
            {
                "step": step,
                "nll": current,
                "grad_norm": grad_norm,
                "prior_precision": {k: float(v) for k, v in zip(groups, log_lam.detach().exp(), strict=True)},
                "temperature": float(log_t.detach().exp()),
            }
        )
        improved = current < best_value - tol
        if current < best_value:
            best_value, best_point = current, (log_lam.detach().clone(), log_t.detach().clone())
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
    best_log_lam, best_log_t = best_point
    return with_prior_precision(start, per_name(best_log_lam.exp())), float(best_log_t.exp()), history
