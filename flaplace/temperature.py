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
[`flaplace.tempered_evidence`][flaplace.tempered_evidence] maximises the evidence over ``T``.

With validation data, [`tune_prior_temperature_nll`][flaplace.tempered_validation.tune_prior_temperature_nll]
fits ``(lambda, T)`` jointly on the validation NLL of the linearised predictive with the logits
divided by ``T``: mean ``f_mu / T`` and covariance ``f_var / T^2``. The posterior's factors are
kept as given, so the validation Jacobians are computed once and every optimiser step only
re-weights them. As ``lambda -> infinity`` the covariance vanishes and the family is temperature
scaling of the MAP; at ``T = 1`` it is the validation NLL of
[`tune_prior_nll`][flaplace.validation.tune_prior_nll].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from flaplace.typing import Batch, ModelFn, Params

__all__ = [
    "TEMPERATURE_LIMITS",
    "TemperedModelFunction",
    "check_temperature",
    "fit_temperature",
    "maximise_on_log_grid",
    "tempered_moments",
]


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, checked positive and finite.

    Examples:
        >>> check_temperature(2.0)
        2.0
    """
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
        self.temperature = check_temperature(temperature)

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


#: The temperatures considered when fitting one (``2^-8 ... 2^12``): temperature scaling of a summed
#: cloze score can need ``T`` in the hundreds.
TEMPERATURE_LIMITS: tuple[float, float] = (2.0**-8, 2.0**12)


def fit_temperature(
    logits: Float[Tensor, "n classes"] | Iterable[Tensor],
    labels: Int[Tensor, " n"] | Iterable[Tensor],
    *,
    bounds: tuple[float, float] = TEMPERATURE_LIMITS,
    tol: float = 1e-6,
) -> float:
    """Temperature scaling: the ``T`` that minimises the mean NLL of ``softmax(logits / T)``.

    With ``beta = 1 / T`` the NLL ``-beta f_y + logsumexp(beta f)`` is convex in ``beta`` (its
    second derivative is the variance of ``f`` under ``softmax(beta f)``), so its derivative
    ``E_beta[f] - f_y`` summed over the rows increases with ``beta``: the minimiser is found by
    bisection on ``log beta`` to ``tol``, within ``bounds`` on ``T`` (a bound is returned when
    the optimum lies beyond it, e.g. ``T -> infinity`` when the logits carry no information).

    Args:
        logits: validation logits ``(n, classes)`` (answer logits of a classifier, or the
            vocabulary logits of the supervised tokens), or an iterable of such chunks.
        labels: the class (token) index of every row, a tensor or chunks matching ``logits``.
        bounds: the smallest and largest temperature considered.
        tol: the bisection stops when the interval of ``log T`` is shorter than this.

    Returns:
        ``T`` (a float).

    Raises:
        ValueError: no rows, mismatched shapes, non-finite logits, or bounds that are not
            ``0 < low < high``.

    Examples:
        >>> logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
        >>> T = fit_temperature(logits, torch.tensor([0, 0, 1, 1]))  # 3 of 4 right: p = 0.75
        >>> round(T * math.log(3), 3)  # softmax(4 / T) = 0.75  <=>  4 / T = log 3
        4.0
    """
    row_chunks = [logits] if isinstance(logits, Tensor) else list(logits)
    label_chunks = [labels] if isinstance(labels, Tensor) else list(labels)
    if len(row_chunks) != len(label_chunks) or any(
        r.ndim != 2 or t.shape != r.shape[:1] for r, t in zip(row_chunks, label_chunks, strict=False)
    ):
        raise ValueError("logits must be (n, classes) chunks with one label per row in labels")
    if sum(int(t.numel()) for t in label_chunks) == 0:
        raise ValueError("fit_temperature needs at least one labelled row")
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    chunks = [
        (r.detach().to(torch.promote_types(r.dtype, torch.float64)), t.to(r.device).long())
        for r, t in zip(row_chunks, label_chunks, strict=True)
    ]
    if not all(bool(torch.isfinite(r).all()) for r, _ in chunks):
        raise ValueError("fit_temperature got non-finite logits")

    def slope(log_beta: float) -> float:  # d NLL / d beta, summed over the rows
        beta = math.exp(log_beta)
        total = 0.0
        for r, t in chunks:
            p = torch.softmax(r * beta, -1)
            total += float(((p * r).sum(-1) - r.gather(-1, t[:, None])[:, 0]).sum())
        return total

    lo, hi = -math.log(high), -math.log(low)  # log beta
    if slope(lo) >= 0:
        return high
    if slope(hi) <= 0:
        return low
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return math.exp(-0.5 * (lo + hi))


#: The golden ratio's conjugate, ``(sqrt 5 - 1) / 2``: the golden-section search's step.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def maximise_on_log_grid(
    evaluate: Callable[[float], float],
    grid: Sequence[float],
    refine_steps: int,
    limits: tuple[float, float] | None = None,
) -> float:
    """The ``x`` with the highest ``evaluate(x)``: a grid search, then a golden-section search in ``log x``.

    With ``limits = (low, high)``, a best point at an end of the grid is not taken as the
    maximum: the grid is extended past that end, one step of its end spacing at a time, while
    the new end is the best and stays within the limits. The golden-section steps then search
    the bracket between the best grid point's neighbours (for a function unimodal there, each
    step shrinks it by the golden ratio); the best point evaluated is returned. ``evaluate`` is
    called once per grid point, once per extension and once per refinement step.

    Examples:
        >>> round(maximise_on_log_grid(lambda x: -math.log(x / 3.0) ** 2, [1.0, 2.0, 4.0, 8.0], 20), 3)
        3.0
        >>> round(maximise_on_log_grid(lambda x: -math.log(x / 300.0) ** 2, [1.0, 2.0, 4.0], 20, (0.1, 1e4)), 1)
        300.0
    """
    seen = {x: evaluate(x) for x in grid}
    ordered = sorted(seen)
    best = max(range(len(ordered)), key=lambda k: seen[ordered[k]])
    while limits is not None and len(ordered) > 1 and best in (0, len(ordered) - 1):
        edge, inner = (ordered[0], ordered[1]) if best == 0 else (ordered[-1], ordered[-2])
        beyond = edge * edge / inner  # one more step of the end spacing, in log x
        if not limits[0] <= beyond <= limits[1] or beyond in seen:
            break
        seen[beyond] = evaluate(beyond)
        ordered = sorted(seen)
        best = max(range(len(ordered)), key=lambda k: seen[ordered[k]])
    if refine_steps and len(ordered) > 1:
        low = math.log(ordered[max(best - 1, 0)])
        high = math.log(ordered[min(best + 1, len(ordered) - 1)])
        inner_low = high - _GOLDEN * (high - low)
        inner_high = low + _GOLDEN * (high - low)
        value_low = seen[math.exp(inner_low)] = evaluate(math.exp(inner_low))
        value_high = seen[math.exp(inner_high)] = evaluate(math.exp(inner_high))
        for _ in range(refine_steps - 2):
            if value_low >= value_high:  # the maximum is in [low, inner_high]
                high, inner_high, value_high = inner_high, inner_low, value_low
                inner_low = high - _GOLDEN * (high - low)
                value_low = seen[math.exp(inner_low)] = evaluate(math.exp(inner_low))
            else:
                low, inner_low, value_low = inner_low, inner_high, value_high
                inner_high = low + _GOLDEN * (high - low)
                value_high = seen[math.exp(inner_high)] = evaluate(math.exp(inner_high))
    return max(seen, key=seen.__getitem__)
