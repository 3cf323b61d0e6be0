"""The evidence over the prior precision and a likelihood temperature ``T`` (see `flaplace.temperature`).

Each temperature needs its own K-FAC pass: the factors of ``f / T``
([`TemperedModelFunction`][flaplace.temperature.TemperedModelFunction]) are fitted and the prior
precision is tuned at that temperature by the evidence
([`evidence_at_temperature`][flaplace.tempered_evidence.evidence_at_temperature]).
[`tune_evidence_temperature`][flaplace.tempered_evidence.tune_evidence_temperature] searches a grid of
temperatures, refined by a golden-section search in ``log T``;
[`soften_by_evidence`][flaplace.tempered_evidence.soften_by_evidence] is the library's default
without validation data: ``T`` climbs from 1 while the evidence rises and the training
log-likelihood gains more than ``log(N) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from torch import Tensor
from tqdm.auto import tqdm

from flaplace.evidence import tune_prior_evidence
from flaplace.kfac import fit as fit_kfac
from flaplace.posterior import PriorPrecision, make_posterior
from flaplace.temperature import TemperedModelFunction, check_temperature, maximise_on_log_grid
from flaplace.typing import Batch, ModelFn, Params, Posterior

__all__ = [
    "DEFAULT_TEMPERATURES",
    "SOFTENING_TEMPERATURES",
    "EvidenceAtTemperature",
    "MappedBatches",
    "evidence_at_temperature",
    "soften_by_evidence",
    "tune_evidence_temperature",
]

#: Default grid of temperatures for `tune_evidence_temperature`: ``2^-2 ... 2^3``, two per octave.
DEFAULT_TEMPERATURES: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 7))
#: The temperatures the default without validation data climbs through (``T >= 1``: the
#: likelihood may only soften; ``T = 16`` already leaves little of a MAP's confidence).
SOFTENING_TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)


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
        An [`EvidenceAtTemperature`][flaplace.tempered_evidence.EvidenceAtTemperature].

    Examples:
        >>> result = evidence_at_temperature(model_fn, params, train_batches, 2.0, fisher="exact")
        >>> result.log_evidence, result.posterior.prior_precision  # doctest: +SKIP
    """
    return _evidence_and_count(
        model_fn, params, batches, temperature, prior_precision=prior_precision, prior_mean=prior_mean,
        per_block=per_block, tune_options=tune_options, progress=progress, **kfac_options,
    )[0]  # fmt: skip


def _evidence_and_count(
    model_fn: ModelFn,
    params: Params,
    batches: Iterable[Batch],
    temperature: float,
    *,
    prior_precision: PriorPrecision,
    prior_mean: Params | None,
    per_block: bool | Sequence[str],
    tune_options: dict[str, Any] | None,
    progress: bool,
    **kfac_options: Any,
) -> tuple[EvidenceAtTemperature, float]:
    """`evidence_at_temperature` and the number of examples its K-FAC pass counted."""
    tempered = TemperedModelFunction(model_fn, temperature)
    factors, state = fit_kfac(tempered, params, batches, progress=progress, **kfac_options)
    posterior = make_posterior(factors, params, prior_precision, prior_mean=prior_mean)
    tuned, history = tune_prior_evidence(
        posterior, state.log_likelihood, per_block=per_block, progress=progress, **(tune_options or {})
    )
    result = EvidenceAtTemperature(
        tempered.temperature, tuned, state.log_likelihood, float(history[-1]["log_evidence"])
    )
    return result, float(state.n_examples)


def _record(result: EvidenceAtTemperature) -> dict[str, Any]:
    return {
        "temperature": result.temperature,
        "log_evidence": result.log_evidence,
        "log_likelihood": float(result.log_likelihood),
        "prior_precision": {n: float(v) for n, v in result.posterior.prior_precision.items()},
    }


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
        ``(best, table)``: the [`EvidenceAtTemperature`][flaplace.tempered_evidence.EvidenceAtTemperature]
        with the highest evidence, and one record per evaluation (``temperature``,
        ``log_evidence``, ``prior_precision`` as ``{block: value}``, ``log_likelihood``).

    Raises:
        ValueError: an empty grid, a non-positive temperature, or ``refine_steps < 0``.

    Examples:
        >>> best, table = tune_evidence_temperature(model_fn, params, train_batches, fisher="exact")
        >>> best.temperature, best.posterior  # doctest: +SKIP
    """
    grid = sorted(check_temperature(t) for t in temperatures)
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
            table.append(_record(result))
            bar.update(1)
        return cache[temperature].log_evidence

    maximise_on_log_grid(evaluate, grid, refine_steps)
    bar.close()
    winner = max(cache.values(), key=lambda r: r.log_evidence)
    return winner, table


class MappedBatches:
    """``fn`` applied to each batch of ``batches`` anew on every pass: re-iterable, as K-FAC passes need.

    Raises:
        ValueError: ``batches`` is a one-shot iterator (a generator): it cannot be read twice.

    Examples:
        >>> moved = MappedBatches(train_loader, lambda b: batch_to(b, "cuda"))  # doctest: +SKIP
    """

    def __init__(self, batches: Iterable[Batch], fn: Callable[[Batch], Batch]):
        if iter(batches) is batches:
            raise ValueError(
                "the batches are a one-shot iterator (e.g. a generator), but one K-FAC pass per "
                "temperature reads them again: pass a list or a DataLoader"
            )
        self.batches, self.fn = batches, fn

    def __iter__(self) -> Iterator[Batch]:
        return (self.fn(batch) for batch in self.batches)


def soften_by_evidence(
    model_fn: ModelFn,
    params: Params,
    batches: Iterable[Batch],
    posterior: Posterior,
    log_likelihood: Tensor,
    *,
    temperatures: Sequence[float] = SOFTENING_TEMPERATURES,
    per_block: bool | Sequence[str] = False,
    tune_options: dict[str, Any] | None = None,
    progress: bool = False,
    **kfac_options: Any,
) -> tuple[EvidenceAtTemperature, list[dict[str, Any]]]:
    """The prior precision and a softening temperature ``T >= 1`` by the evidence: the default without validation data.

    ``posterior`` and ``log_likelihood`` are the untempered fit on ``batches`` (``T = 1``); its
    ``lambda`` is tuned by the evidence first. Then ``T`` climbs through ``temperatures``
    (2, 4, 8, 16), one K-FAC pass of ``f / T`` and one tuning of ``lambda`` each, and moves up
    while the evidence rises **and** the training log-likelihood ``LL_T`` rises by more than
    ``log(N) / 2`` nats (``N`` training examples):

    * the likelihood is only ever softened: for a MAP that fits its training data exactly the
      evidence keeps rising as ``T -> 0``, a sharpening that says nothing about new data;
    * a softer likelihood is taken only where it fits the training data better, i.e. where the
      MAP is overconfident on the very data it was fitted to. Where ``LL_T`` falls, the evidence
      can rise only through its Occam factor, and on an adapter of 10^5 weights that factor
      favours flat predictions even for a well-calibrated MAP (SST-2 in the prior study: the
      evidence alone climbs to ``T = 16`` and adds 0.21 to the test NLL).
    * ``log(N) / 2`` is what one more fitted parameter must gain in the data term to be kept by
      BIC, the large-``N`` evidence of a parameter with a broad prior: ``T`` is one, and a
      softening that barely changes the training fit is left out (BoolQ early in the study:
      a gain of 1.8 nats on 256 examples).

    A MAP that is not softened costs one extra K-FAC pass (``T = 2``).

    Args:
        model_fn: ``f(params, batch) -> logits`` (untempered).
        params: the MAP weights.
        batches: the training data (re-iterable: a list, a DataLoader or `MappedBatches`).
        posterior: the untempered posterior (its prior mean is kept).
        log_likelihood: its summed training log-likelihood.
        temperatures: the climb, from ``1.0`` upwards.
        per_block: one ``lambda`` (``False``), one per block (``True``) or per keyword group.
        tune_options: passed to [`tune_prior_evidence`][flaplace.evidence.tune_prior_evidence].
        progress: show a progress bar over the temperatures.
        **kfac_options: passed to [`fit_kfac`][flaplace.kfac.fit]; they must be those of ``posterior``'s fit.

    Returns:
        ``(best, table)``: the [`EvidenceAtTemperature`][flaplace.tempered_evidence.EvidenceAtTemperature]
        where the climb stopped, and one record per evaluated temperature as in
        `tune_evidence_temperature`.

    Raises:
        ValueError: ``temperatures`` does not start at 1, or holds a non-positive value.

    Examples:
        >>> factors, state = fit_kfac(model_fn, params, train_batches, fisher="exact")
        >>> best, table = soften_by_evidence(model_fn, params, train_batches,
        ...     make_posterior(factors, params, 1.0), state.log_likelihood, fisher="exact")
        >>> best.temperature, best.posterior  # doctest: +SKIP
    """
    climb = sorted(check_temperature(t) for t in temperatures)
    if climb[0] != 1.0:
        raise ValueError(f"the climb starts at T = 1 (the untempered fit), got {list(temperatures)}")
    tuned, history = tune_prior_evidence(
        posterior, log_likelihood, per_block=per_block, progress=False, **(tune_options or {})
    )
    best = EvidenceAtTemperature(1.0, tuned, log_likelihood, float(history[-1]["log_evidence"]))
    table = [_record(best)]
    for temperature in tqdm(climb[1:], disable=not progress, desc="softening by the evidence"):
        softer, n_examples = _evidence_and_count(
            model_fn, params, batches, temperature, prior_precision=best.posterior.prior_precision,
            prior_mean=posterior.prior_mean, per_block=per_block, tune_options=tune_options, progress=False,
            **kfac_options,
        )  # fmt: skip
        table.append(_record(softer))
        gain = float(softer.log_likelihood) - float(best.log_likelihood)
        if softer.log_evidence <= best.log_evidence or gain <= math.log(n_examples) / 2:
            break
        best = softer
    return best, table
