"""The evidence inside the training loop: online tuning of the prior precision (and a temperature).

Online marginal-likelihood tuning (Immer et al., ICML 2021) keeps the prior's hyperparameters
as part of the training state. While the adapter trains under the loss

    mean loss + (lambda / (2N)) ||theta - m||^2          (`prior_penalty`)

every ``every`` optimiser steps the K-FAC factors are refitted at the current weights on the
most recent batches, and the prior precision ``lambda`` (log-parametrised; one value or one per
block group) takes evidence-gradient steps. The MAP is thus trained under the prior the evidence
prefers, and when training ends the posterior (`online_posterior`) is ready: its factors are
those of the last refresh, its prior the tuned one, with no pass over the whole training set.

**Normalisation.** K-FAC's ``S`` factor and the log-likelihood are sums over the examples they
saw; ``A`` is a mean. The window of recent batches holds ``n`` examples of the ``N`` in the
training set, so ``S`` and the log-likelihood are multiplied by ``N / n`` (``A`` is kept): the
evidence is an estimate of that of the WHOLE training set, whose stationary point in ``lambda``
matches the post-hoc one when the window is representative (exactly, when the window is the
training set or copies of it). ``N`` counts examples in the unit of K-FAC's ``n_examples``
(rows of a batch; one example of a multiple-choice batch is one row).

With ``tune_temperature=True`` the state also holds a likelihood temperature ``T``
(``p(y | f) = softmax(f / T)``, see [`flaplace.temperature`][flaplace.temperature]): each
refresh evaluates the evidence, maximised over ``lambda``, at ``T`` and at ``T e^{+-h}`` (three
K-FAC passes over the window) and moves to the best of the three; ``h`` halves when ``T`` is
already the best and doubles (up to its start) when it is not, a pattern search that settles at
the maximum within ``temperature_tol`` in ``log T``.

Examples:
    >>> init, update = build_online_evidence(model_fn, n_train=1000, every=50)  # doctest: +SKIP
    >>> state = init(params)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     loss = loss_fn(params, batch) + prior_penalty(params, state.prior_precision, 1000)
    ...     ...  # optimiser step
    ...     state = update(state, params, batch)
    >>> posterior = online_posterior(state, params)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from flaplace.evidence import log_marginal_likelihood, tune_prior_evidence
from flaplace.kfac import build
from flaplace.kfac_state import kfac_factors
from flaplace.posterior import PriorPrecision, make_posterior, prior_precision_per_block
from flaplace.temperature import TemperedModelFunction
from flaplace.typing import Batch, Eigen, Factors, KronFactor, ModelFn, Params, Posterior

__all__ = [
    "OnlineEvidence",
    "OnlineEvidenceState",
    "build_online_evidence",
    "online_posterior",
    "prior_penalty",
    "rescale_factors",
]


class OnlineEvidenceState(NamedTuple):
    """The hyperparameters and the recent statistics of online evidence tuning.

    ``prior_precision``: one 0-d tensor per block (blocks tuned together share one value);
    ``temperature``: the likelihood temperature (0-d; 1 unless tuned); ``temperature_step``:
    the current step ``h`` of ``log T``; ``n_train``: the training set's size ``N``; ``step``:
    optimiser steps seen; ``window``: the batches of the most recent steps (one tuple per
    step); ``factors``: the K-FAC factors of the last refresh, rescaled to ``N`` (``None``
    before the first); ``log_likelihood``: that refresh's log-likelihood, rescaled to ``N``;
    ``log_evidence``: ``log Z`` at the tuned hyperparameters (both NaN before the first
    refresh); ``refreshes``: how many refreshes ran; ``prior_mean``: the prior's centre
    (``None``: zero).
    """

    prior_precision: dict[str, Tensor]
    temperature: Tensor
    temperature_step: Tensor
    n_train: Tensor
    step: Tensor
    window: tuple[tuple[Batch, ...], ...]
    factors: Factors | None
    log_likelihood: Tensor
    log_evidence: Tensor
    refreshes: Tensor
    prior_mean: Params | None


class OnlineEvidence(NamedTuple):
    """The pure pair returned by `build_online_evidence`."""

    init: Callable[..., OnlineEvidenceState]  # (params) -> state
    update: Callable[..., OnlineEvidenceState]  # (state, params, *batches, refresh=None) -> state


def rescale_factors(factors: Factors, scale: float | Tensor) -> Factors:
    """The factors with ``S`` multiplied by ``scale`` (``A``, a mean, is kept).

    K-FAC over ``n`` examples estimates the curvature of ``N`` examples as ``(N / n) S (x) A``.

    Examples:
        >>> import torch
        >>> unit = Eigen(torch.eye(2), torch.ones(2))
        >>> doubled = rescale_factors({"W": KronFactor(unit, unit, torch.tensor(False))}, 2.0)
        >>> doubled["W"].S.values, doubled["W"].A.values
        (tensor([2., 2.]), tensor([1., 1.]))
    """
    return {
        name: KronFactor(Eigen(f.S.vectors, f.S.values * scale), f.A, f.transposed)
        for name, f in factors.items()
    }


def prior_penalty(
    params: Params,
    prior_precision: PriorPrecision,
    n_train: int | float | Tensor,
    prior_mean: Params | None = None,
) -> Float[Tensor, ""]:
    """The Gaussian prior's term for a MEAN training loss: ``sum_b (lambda_b / (2N)) ||theta_b - m_b||^2``.

    The negative log posterior is ``sum_n l_n + sum_b (lambda_b / 2) ||theta_b - m_b||^2``; divided
    by ``N`` it is the mean loss plus this term, so its minimiser is the MAP of the prior
    ``N(m, 1/lambda I)`` (the convention of the Trainer integration's ``gaussian_prior_penalty``).
    Differentiable in ``params``; the prior precision is treated as a constant (detached).

    Args:
        params: the adapter weights (they may require grad).
        prior_precision: a float or tensor for every block, or a mapping from exact names or
            case-insensitive keywords to values (e.g. ``state.prior_precision``).
        n_train: ``N``, the number of terms the mean loss runs over.
        prior_mean: the prior's centre per block; ``None``: zero.

    Raises:
        ValueError: ``n_train`` below 1, a prior mean without some block, or a bad prior precision.

    Examples:
        >>> import torch
        >>> float(prior_penalty({"w": torch.ones(2)}, 4.0, n_train=2))  # 4 / (2 * 2) * 2
        2.0
    """
    if float(n_train) < 1:
        raise ValueError(f"n_train must be at least 1, got {float(n_train)}")
    names = list(params)
    if prior_mean is not None and not set(names) <= set(prior_mean):
        missing = sorted(set(names) - set(prior_mean))
        raise ValueError(f"prior_mean has no tensor for {missing[0]!r}; give one per weight of params")
    first = params[names[0]]
    dtype = first.dtype if first.is_floating_point() else torch.float32
    lam = prior_precision_per_block(
        names,
        {k: v.detach() if isinstance(v, Tensor) else v for k, v in prior_precision.items()}
        if isinstance(prior_precision, Mapping)
        else (prior_precision.detach() if isinstance(prior_precision, Tensor) else prior_precision),
        dtype=dtype,
        device=first.device,
    )
    total = first.new_zeros((), dtype=dtype)
    for name in names:
        delta = params[name] if prior_mean is None else params[name] - prior_mean[name].to(first.device)
        total = total + lam[name].to(delta.dtype) * delta.square().sum()
    return total / (2 * float(n_train))


def online_posterior(state: OnlineEvidenceState, params: Params) -> Posterior:
    """The Laplace posterior at ``params`` with the online state's factors and tuned prior.

    The factors are those of the last refresh (rescaled to the training set's size); call
    ``update(state, params, refresh=True)`` first to refit them at the final weights on the
    last window (a pass over the window only). With a tuned temperature ``T`` the posterior is
    that of the tempered likelihood: use ``TemperedModelFunction(model_fn, float(state.temperature))``
    as the model function of its predictive.

    Raises:
        ValueError: a state that has not been refreshed yet.

    Examples:
        >>> state = update(state, params, refresh=True)  # doctest: +SKIP
        >>> posterior = online_posterior(state, params)  # doctest: +SKIP
    """
    if state.factors is None:
        raise ValueError(
            "the online state has no factors yet: call update(state, params, refresh=True) after at "
            "least one step"
        )
    return make_posterior(
        state.factors, {n: params[n] for n in state.factors}, state.prior_precision, state.prior_mean
    )


def build_online_evidence(
    model_fn: ModelFn,
    *,
    n_train: int,
    every: int = 50,
    window: int | None = None,
    prior_precision: PriorPrecision = 1.0,
    prior_mean: Params | None = None,
    per_block: bool | Sequence[str] = False,
    evidence_steps: int = 100,
    lr: float = 0.1,
    tune_temperature: bool = False,
    temperature: float = 1.0,
    temperature_step: float = 0.25,
    temperature_tol: float = 0.01,
    **kfac_options: Any,
) -> OnlineEvidence:
    """Build the pure pair ``(init, update)`` that tunes the prior by the evidence while training.

    Args:
        model_fn: ``f(params, batch) -> logits`` (untempered), e.g. a
            [`ModelFunction`][flaplace.params.ModelFunction].
        n_train: ``N``, the number of training examples (the evidence is that of all of them).
        every: refresh (refit K-FAC on the window, tune the hyperparameters) every ``every``
            optimiser steps.
        window: how many recent optimiser steps' batches the refresh uses (default ``every``:
            the batches since the last refresh).
        prior_precision: the starting ``lambda`` (as for
            [`make_posterior`][flaplace.posterior.make_posterior]).
        prior_mean: the prior's centre per block (``None``: zero), e.g. the adapters at initialisation.
        per_block: one ``lambda`` (``False``), one per block (``True``) or one per keyword group.
        evidence_steps: the most Adam steps on ``log lambda`` per refresh (fewer when the gradient
            test of [`tune_prior_evidence`][flaplace.evidence.tune_prior_evidence] is met).
        lr: Adam's learning rate on ``log lambda``.
        tune_temperature: also tune a likelihood temperature ``T`` (three K-FAC passes per refresh).
        temperature: the starting (or, without tuning, the fixed) temperature.
        temperature_step: the first step ``h`` of ``log T`` (and the largest).
        temperature_tol: the smallest step of ``log T``.
        **kfac_options: passed to [`build`][flaplace.kfac.build] (``fisher``, ``sharing``, ``n_kfac``, ...).

    Returns:
        ``OnlineEvidence(init, update)``: ``init(params) -> state`` and
        ``update(state, params, *batches, refresh=None) -> state``. Call ``update`` after every
        optimiser step with that step's batch (or its micro-batches under gradient
        accumulation); it refreshes after every ``every``-th step, or when ``refresh=True``
        (with no batches: refit at the current weights without counting a step).

    Raises:
        ValueError: ``n_train``, ``every``, ``window``, ``evidence_steps`` or the temperature
            settings out of range.

    Examples:
        >>> init, update = build_online_evidence(model_fn, n_train=len(train_set), every=20, fisher="exact")  # doctest: +SKIP
    """
    if n_train < 1 or every < 1 or (window is not None and window < 1) or evidence_steps < 0:
        raise ValueError(
            f"need n_train >= 1, every >= 1, window >= 1 (or None) and evidence_steps >= 0; got "
            f"n_train={n_train}, every={every}, window={window}, evidence_steps={evidence_steps}"
        )
    if not (temperature > 0 and 0 < temperature_tol <= temperature_step):
        raise ValueError(
            f"need temperature > 0 and 0 < temperature_tol <= temperature_step; got temperature={temperature}, "
            f"temperature_tol={temperature_tol}, temperature_step={temperature_step}"
        )
    kept = every if window is None else window
    kfac_options.pop("progress", None)

    def init(params: Params) -> OnlineEvidenceState:
        names = list(params)
        if not names:
            raise ValueError("no parameters to tune a prior for")
        first = params[names[0]]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        lam = prior_precision_per_block(names, prior_precision, dtype=dtype, device=first.device)
        nan = torch.tensor(float("nan"), dtype=dtype, device=first.device)

        def scalar(value: float | int) -> Tensor:
            return torch.tensor(float(value), dtype=dtype, device=first.device)

        return OnlineEvidenceState(
            prior_precision={n: v.detach().clone() for n, v in lam.items()},
            temperature=scalar(temperature),
            temperature_step=scalar(temperature_step),
            n_train=scalar(n_train),
            step=torch.zeros((), dtype=torch.long),
            window=(),
            factors=None,
            log_likelihood=nan.clone(),
            log_evidence=nan.clone(),
            refreshes=torch.zeros((), dtype=torch.long),
            prior_mean=None if prior_mean is None else {n: prior_mean[n].detach().clone() for n in names},
        )

    def at_temperature(
        state: OnlineEvidenceState, params: Params, value: float
    ) -> tuple[Posterior, Tensor, float]:
        """Window K-FAC of ``f / T``, rescaled to ``N``, and ``lambda`` tuned from the state's."""
        batches = [b for step_batches in state.window for b in step_batches]
        k_init, k_update = build(TemperedModelFunction(model_fn, value), **kfac_options)
        statistics = k_init(params, batches[0])
        for batch in batches:
            statistics = k_update(statistics, params, batch)
        scale = state.n_train / statistics.n_examples.to(state.n_train.dtype)
        factors = rescale_factors(kfac_factors(statistics), scale)
        log_likelihood = statistics.log_likelihood.to(scale.dtype) * scale
        posterior = make_posterior(factors, params, state.prior_precision, state.prior_mean)
        if evidence_steps == 0:
            return posterior, log_likelihood, float(log_marginal_likelihood(posterior, log_likelihood))
        with warnings.catch_warnings():  # a few steps per refresh: not converging is expected
            warnings.simplefilter("ignore", RuntimeWarning)
            tuned, history = tune_prior_evidence(
                posterior, log_likelihood, steps=evidence_steps, lr=lr, per_block=per_block, progress=False
            )
        return tuned, log_likelihood, float(history[-1]["log_evidence"])

    def refreshed(state: OnlineEvidenceState, params: Params) -> OnlineEvidenceState:
        if not state.window:
            raise ValueError("nothing to refresh on: call update with the batches of at least one step first")
        params = {n: p.detach() for n, p in params.items()}
        centre = float(state.temperature)
        step = float(state.temperature_step)
        candidates = [centre]
        if tune_temperature:
            candidates += [centre * math.exp(-step), centre * math.exp(step)]
        results = [at_temperature(state, params, value) for value in candidates]
        best = max(range(len(results)), key=lambda k: results[k][2])
        if tune_temperature:  # shrink the step when the centre is best, grow it back when it is not
            step = max(step / 2, temperature_tol) if best == 0 else min(step * 2, temperature_step)
        posterior, log_likelihood, log_evidence = results[best]
        dtype, device = state.n_train.dtype, state.n_train.device
        return state._replace(
            prior_precision={
                n: v.detach().to(dtype=dtype, device=device) for n, v in posterior.prior_precision.items()
            },
            temperature=torch.tensor(candidates[best], dtype=dtype, device=device),
            temperature_step=torch.tensor(step, dtype=dtype, device=device),
            factors=posterior.factors,
            log_likelihood=log_likelihood.detach().to(dtype=dtype, device=device),
            log_evidence=torch.tensor(log_evidence, dtype=dtype, device=device),
            refreshes=state.refreshes + 1,
        )

    def update(
        state: OnlineEvidenceState, params: Params, *batches: Batch, refresh: bool | None = None
    ) -> OnlineEvidenceState:
        if batches:
            state = state._replace(window=(*state.window, tuple(batches))[-kept:], step=state.step + 1)
        due = bool(batches) and int(state.step) % every == 0
        if refresh if refresh is not None else due:
            state = refreshed(state, params)
        return state

    return OnlineEvidence(init, update)
