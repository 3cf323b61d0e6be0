"""Prior precision and a likelihood temperature fitted jointly on validation NLL.

The model is the linearised predictive with the logits divided by ``T``: mean ``f_mu / T`` and
covariance ``f_var(lambda) / T^2`` (see [`flaplace.temperature`][flaplace.temperature]). The
posterior's factors are kept as given, so the validation Jacobians are computed once
([`validation_features`][flaplace.validation.validation_features]) and every optimiser step only
re-weights them. As ``lambda -> infinity`` the covariance vanishes and the family is temperature
scaling of the MAP; at ``T = 1`` it is the validation NLL of
[`tune_prior_nll`][flaplace.validation.tune_prior_nll].

The default with validation data does not pick one member of the family: it averages the best
posterior and temperature scaling of the MAP with Akaike weights
([`scaling_mixture`][flaplace.tempered_validation.scaling_mixture]), so a posterior that wins
on the validation data by less than its extra fitted parameter is worth shares only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.evidence import DEFAULT_GRID, free_parameter_groups
from flaplace.jacobians import JacobianMethod
from flaplace.posterior import PriorPrecision, with_prior_precision
from flaplace.predictive import Directions, check_directions, covariance_from_features
from flaplace.temperature import TEMPERATURE_LIMITS, check_temperature, maximise_on_log_grid, tempered_moments
from flaplace.typing import Batch, Likelihood, ModelFn, Posterior
from flaplace.validation import (
    ValidationFeatures,
    check_differentiable_link,
    labels_nll,
    minimise_validation_nll,
    validation_features,
)

__all__ = [
    "GRID_TEMPERATURES",
    "MAP_LIMIT",
    "ScalingMixture",
    "akaike_weight",
    "mix_with_scaling",
    "scaling_mixture",
    "tempered_nll_at",
    "tune_prior_temperature_grid",
    "tune_prior_temperature_nll",
    "validation_nll_tempered",
]


def validation_nll_tempered(
    posterior: Posterior,
    features: ValidationFeatures,
    temperature: float | Tensor = 1.0,
    *,
    link: str = "probit",
    likelihood: Likelihood = "categorical",
    directions: Directions = "all",
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
        directions: the predictive's covariance, ``"all"`` (default) or ``"informed"`` (see
            [`predictive_precompute`][flaplace.predictive.predictive_precompute]).

    Examples:
        >>> features = validation_features(posterior, model_fn, val_batches)  # doctest: +SKIP
        >>> nll = validation_nll_tempered(posterior, features, 1.5)  # doctest: +SKIP
    """
    check_differentiable_link(link)
    check_directions(directions)
    f_var = covariance_from_features(posterior, features.covariance, directions)
    f_mu, f_var = tempered_moments(features.f_mu.to(f_var.dtype), f_var, temperature)
    return labels_nll(f_mu, f_var, features.labels, link, likelihood)


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
    directions: Directions = "all",
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
        directions: the predictive's covariance, ``"all"`` (default) or ``"informed"`` (see
            [`predictive_precompute`][flaplace.predictive.predictive_precompute]).
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
    check_differentiable_link(link)
    check_directions(directions)
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
        math.log(check_temperature(temperature)), dtype=reference.dtype, device=reference.device
    )
    tunable = [(log_lam, tune_prior), (log_t, tune_temperature)]
    free = [t.requires_grad_(True) for t, on in tunable if on]

    def per_name(values: Tensor) -> dict[str, Tensor]:
        return {n: values[k] for k, members in enumerate(groups.values()) for n in members}

    def objective() -> Tensor:
        posterior = with_prior_precision(start, per_name(log_lam.exp()))
        return validation_nll_tempered(
            posterior, features, log_t.exp(), link=link, likelihood=likelihood, directions=directions
        )

    def record() -> dict[str, Any]:
        return {
            "prior_precision": {k: float(v) for k, v in zip(groups, log_lam.detach().exp(), strict=True)},
            "temperature": float(log_t.detach().exp()),
        }

    best, history = minimise_validation_nll(
        objective,
        free,
        record,
        steps=steps,
        lr=lr,
        betas=betas,
        tol=tol,
        patience=patience,
        decay=decay,
        progress=progress,
        desc="prior precision and temperature (validation NLL)",
    )
    best_by_tensor = iter(best)
    best_log_lam, best_log_t = (next(best_by_tensor) if on else t.detach() for t, on in tunable)
    return with_prior_precision(start, per_name(best_log_lam.exp())), float(best_log_t.exp()), history


def tempered_nll_at(
    features: ValidationFeatures,
    *,
    link: str = "probit",
    likelihood: Likelihood = "categorical",
    directions: Directions = "all",
) -> Callable[[Posterior], Callable[[float], Tensor]]:
    """The ``nll_at`` of `tune_prior_temperature_grid` on precomputed validation features.

    ``nll_at(candidate)`` computes the candidate's validation covariance once and returns
    ``T -> `` the mean NLL of ``N(f_mu / T, f_var / T^2)`` through ``link`` (as
    `validation_nll_tempered`).

    Examples:
        >>> features = validation_features(posterior, model_fn, val_batches)  # doctest: +SKIP
        >>> tuned, T, table = tune_prior_temperature_grid(posterior, tempered_nll_at(features))  # doctest: +SKIP
    """

    def nll_at(candidate: Posterior) -> Callable[[float], Tensor]:
        f_var = covariance_from_features(candidate, features.covariance, directions)
        f_mu = features.f_mu.to(f_var.dtype)
        return lambda t: labels_nll(*tempered_moments(f_mu, f_var, t), features.labels, link, likelihood)

    return nll_at


#: The temperatures `tune_prior_temperature_grid` starts from (``2^-2 ... 2^4``): extended past an end
#: where the best ``T`` lies (up to `TEMPERATURE_LIMITS`), then refined in ``log T``.
GRID_TEMPERATURES: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 9))
#: The prior precision that stands for ``lambda -> infinity``: no posterior variance, the MAP.
MAP_LIMIT = 1e12


def tune_prior_temperature_grid(
    posterior: Posterior,
    nll_at: Callable[[Posterior], Callable[[float], float | Tensor]],
    grid: Sequence[float] | None = None,
    *,
    temperatures: Sequence[float] = GRID_TEMPERATURES,
    refine_steps: int = 16,
    limits: tuple[float, float] = TEMPERATURE_LIMITS,
    progress: bool = True,
) -> tuple[Posterior, float, list[dict[str, float]]]:
    """Prior precision and temperature jointly by the lowest validation NLL, temperature scaling included.

    For every prior precision of ``grid`` and for ``lambda -> infinity`` (`MAP_LIMIT`: no
    posterior variance, i.e. temperature scaling of the MAP), the best temperature is found by
    a grid over ``temperatures``, extended past an end where the best ``T`` lies there (within
    ``limits``), and refined by ``refine_steps`` golden-section steps in ``log T``
    ([`maximise_on_log_grid`][flaplace.temperature.maximise_on_log_grid]); the pair with the
    lowest NLL wins. Because temperature scaling is one of the candidates, the result is never
    worse on the validation data than temperature scaling (up to the temperature search's
    resolution). Unlike the gradient-based
    [`tune_prior_temperature_nll`][flaplace.tempered_validation.tune_prior_temperature_nll], it
    cannot stall where the NLL is flat in ``lambda``.

    Args:
        posterior: from [`make_posterior`][flaplace.posterior.make_posterior].
        nll_at: ``nll_at(candidate)`` returns ``T -> `` the validation NLL of the predictive
            ``N(f_mu / T, f_var / T^2)`` of a candidate posterior; it is called once per
            candidate, so what does not depend on ``T`` (the covariance ``f_var``) is computed
            there once (e.g. `covariance_from_features` on precomputed validation features).
        grid: candidate prior precisions; default `flaplace.evidence.DEFAULT_GRID` (10^-4 ... 10^4).
        temperatures: the temperature grid each search starts from.
        limits: how far the grid may be extended past its ends.
        refine_steps: golden-section steps after the temperature grid.
        progress: show a tqdm progress bar.

    Returns:
        ``(posterior, temperature, table)``: the posterior at the best prior precision, the best
        temperature, and one ``{"prior_precision", "temperature", "nll"}`` record per prior
        precision.

    Raises:
        ValueError: an empty or non-positive grid, or no candidate with a finite NLL.

    Examples:
        >>> features = validation_features(posterior, model_fn, val_batches)
        >>> tuned, T, table = tune_prior_temperature_grid(
        ...     posterior, lambda p: lambda t: validation_nll_tempered(p, features, t))
    """
    candidates = [*(DEFAULT_GRID if grid is None else [float(g) for g in grid]), MAP_LIMIT]
    if not all(math.isfinite(g) and g > 0 for g in candidates) or not temperatures:
        raise ValueError(f"need positive, finite prior precisions and temperatures, got {candidates[:-1]}")
    table: list[dict[str, float]] = []
    for value in tqdm(candidates, disable=not progress, desc="prior precision and temperature (grid)"):
        nll_of_temperature = nll_at(with_prior_precision(posterior, value))

        def score(temperature: float, nll_of_temperature: Callable = nll_of_temperature) -> float:
            nll = float(nll_of_temperature(temperature))
            return -nll if math.isfinite(nll) else -math.inf

        temperature = maximise_on_log_grid(score, temperatures, refine_steps, limits)
        table.append({"prior_precision": value, "temperature": temperature, "nll": -score(temperature)})
    best = min((row for row in table if math.isfinite(row["nll"])), key=lambda row: row["nll"], default=None)
    if best is None:
        raise ValueError("no prior precision and temperature on the grid gave a finite NLL")
    return with_prior_precision(posterior, best["prior_precision"]), best["temperature"], table


class ScalingMixture(NamedTuple):
    """A posterior's predictive averaged with temperature scaling of the MAP.

    The probabilities are ``weight * p_posterior + (1 - weight) * softmax(f_mu / temperature)``:
    ``weight`` is the posterior's Akaike weight and ``temperature`` that of temperature scaling
    (not the posterior's own likelihood temperature).
    """

    weight: float
    temperature: float


def akaike_weight(log_likelihood_gain: float, extra_parameters: int = 1) -> float:
    """The Akaike weight of the richer of two fitted models: ``1 / (1 + exp(k - gain))``.

    Akaike weights are ``exp(-AIC / 2) = exp(log L - k)`` normalised over the models; for two
    models whose summed log-likelihoods differ by ``gain`` and whose numbers of fitted parameters
    differ by ``k = extra_parameters`` this is the richer model's share.

    Raises:
        ValueError: a non-finite gain or a negative ``extra_parameters``.

    Examples:
        >>> akaike_weight(1.0)  # a gain of exactly the price of one more parameter: even odds
        0.5
        >>> round(akaike_weight(0.0), 3)  # no gain: the simpler model carries most of the weight
        0.269
    """
    if not math.isfinite(log_likelihood_gain) or extra_parameters < 0:
        raise ValueError(
            f"need a finite gain and extra_parameters >= 0, got {log_likelihood_gain} and {extra_parameters}"
        )
    exponent = extra_parameters - log_likelihood_gain
    if exponent > 0:  # written so that exp cannot overflow
        odds = math.exp(-exponent)
        return odds / (1.0 + odds)
    return 1.0 / (1.0 + math.exp(exponent))


def scaling_mixture(table: Sequence[dict[str, float]], n_examples: int) -> ScalingMixture:
    """The Akaike-weighted average of `tune_prior_temperature_grid`'s winner and temperature scaling.

    The winner (the lowest mean NLL of ``table``) fitted two hyperparameters, ``lambda`` and
    ``T``, on the ``n_examples`` validation examples; temperature scaling (the ``MAP_LIMIT``
    row) fitted one. The winner's weight is `akaike_weight` of its summed validation
    log-likelihood gain, ``n_examples * (nll_scaling - nll_winner)``, at the price of one
    parameter: a posterior that wins by less than one nat is worth less than half. Where the
    winner is temperature scaling itself, its weight is 0.

    Averaging cannot lose much to either member: per example, the mixture's NLL is at most
    the weighted average of the two NLLs (the logarithm is concave). On validation data it is
    therefore never worse than temperature scaling, and on test data its NLL minus temperature
    scaling's is at most ``weight`` times the winner's.

    Raises:
        ValueError: ``table`` has no ``MAP_LIMIT`` row or no finite NLL, or ``n_examples < 1``.

    Examples:
        >>> table = [{"prior_precision": 1.0, "temperature": 2.0, "nll": 0.50},
        ...          {"prior_precision": MAP_LIMIT, "temperature": 1.5, "nll": 0.515625}]
        >>> scaling_mixture(table, 64)  # a gain of 1 nat over 64 examples: even odds
        ScalingMixture(weight=0.5, temperature=1.5)
    """
    if n_examples < 1:
        raise ValueError(f"need at least one validation example, got {n_examples}")
    scaling = next((row for row in table if row["prior_precision"] >= MAP_LIMIT), None)
    finite = [row for row in table if math.isfinite(row["nll"])]
    if scaling is None or not finite or not math.isfinite(scaling["nll"]):
        raise ValueError("the table needs a finite temperature-scaling row (prior precision MAP_LIMIT)")
    best = min(finite, key=lambda row: row["nll"])
    if best is scaling:
        return ScalingMixture(0.0, float(scaling["temperature"]))
    gain = n_examples * (float(scaling["nll"]) - float(best["nll"]))
    return ScalingMixture(akaike_weight(gain), float(scaling["temperature"]))


def mix_with_scaling(
    probs: Float[Tensor, "batch outcomes"],
    map_logits: Float[Tensor, "batch classes"],
    mixture: ScalingMixture | None,
    likelihood: Likelihood = "categorical",
) -> Float[Tensor, "batch outcomes"]:
    """``weight * probs + (1 - weight) * p(map_logits / temperature)``; ``probs`` without a mixture.

    ``p`` is the softmax (the sigmoid as ``[1 - p, p]`` for the bernoulli likelihood's one logit).

    Examples:
        >>> mix_with_scaling(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 2.0]]), ScalingMixture(0.5, 2.0))
        tensor([[0.3845, 0.6155]])
    """
    if mixture is None or mixture.weight == 1.0:
        return probs
    scaled = (map_logits / mixture.temperature).to(probs.dtype)
    if likelihood == "bernoulli":
        positive = torch.sigmoid(scaled.reshape(-1))
        point = torch.stack([1.0 - positive, positive], dim=-1)
    else:
        point = torch.softmax(scaled, dim=-1)
    return mixture.weight * probs + (1.0 - mixture.weight) * point
