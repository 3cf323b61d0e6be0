"""The sampling predictive: the model run at posterior weight draws, its probabilities averaged.

``p(y | x) = (1/S) sum_s softmax(f(theta_s, x))`` with ``theta_s ~ N(theta*, Sigma)`` drawn by
[`sample`][flaplace.posterior.sample]; the alternative to the linearised predictive of
[`flaplace.predictive`][flaplace.predictive] that needs no Jacobians.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from flaplace.posterior import sample
from flaplace.typing import Batch, Likelihood, ModelFn, Params, Posterior

__all__ = ["batch_to", "logits_at", "sampling_probs"]


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor moved to ``device`` (other leaves unchanged).

    Examples:
        >>> batch_to({"input_ids": ids, "labels": y}, "cuda")["input_ids"].device  # doctest: +SKIP
        device(type='cuda', index=0)
    """
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(v.to(device) if isinstance(v, Tensor) else v for v in batch)
    raise TypeError(
        f"a batch is a mapping of tensors or a tuple (inputs, targets); got {type(batch).__name__}"
    )


@torch.no_grad()
def logits_at(model_fn: ModelFn, draws: Params, batch: Batch) -> Float[Tensor, "samples batch classes"]:
    """The model's logits at each of ``S`` weight draws: ``f(theta_s, batch)`` stacked.

    Args:
        model_fn: ``f(params, batch) -> logits (B, C)``.
        draws: ``{name: (S, *param.shape)}``, e.g. from [`sample`][flaplace.posterior.sample].
        batch: the inputs.

    Returns:
        ``(S, B, C)`` logits (no gradient).

    Examples:
        >>> logits = logits_at(model_fn, sample(posterior, 16), batch)  # (16, B, C)
    """
    counts = {int(d.shape[0]) for d in draws.values()}
    if len(counts) != 1:
        raise ValueError(f"draws must all have the same number of samples, got {sorted(counts)}")
    n = counts.pop()
    return torch.stack([model_fn({name: d[s] for name, d in draws.items()}, batch) for s in range(n)])


def sampling_probs(
    model_fn: ModelFn,
    posterior: Posterior,
    batch: Batch,
    n_samples: int = 100,
    *,
    generator: torch.Generator | None = None,
    likelihood: Likelihood = "categorical",
) -> Float[Tensor, "batch outcomes"]:
    """The sampling (``"nn"``) predictive: average the class probabilities over posterior weight draws.

    ``p(y | x) = (1/S) sum_s softmax(f(theta_s, x))`` with ``theta_s ~ N(theta*, Sigma)``
    (sigmoid and ``[1 - p, p]`` for the bernoulli likelihood). Unlike the linearised predictive
    it runs the network itself at each draw, so it needs no Jacobians; its error is the Monte
    Carlo error of ``S`` samples.

    Args:
        model_fn: ``f(params, batch) -> logits (B, C)``.
        posterior: from [`make_posterior`][flaplace.posterior.make_posterior].
        batch: the inputs.
        n_samples: weight draws ``S``.
        generator: a ``torch.Generator`` on the posterior's device, for reproducible draws.
        likelihood: ``"categorical"`` or ``"bernoulli"`` (one logit).

    Returns:
        Probabilities ``(B, C)``, or ``(B, 2)`` for the bernoulli likelihood.

    Examples:
        >>> probs = sampling_probs(model_fn, posterior, batch, 64, generator=torch.Generator().manual_seed(0))
    """
    if likelihood not in ("categorical", "bernoulli"):
        raise ValueError(f"likelihood must be 'categorical' or 'bernoulli', got {likelihood!r}")
    logits = logits_at(model_fn, sample(posterior, n_samples, generator), batch)
    if likelihood == "bernoulli":
        if logits.shape[-1] != 1:
            raise ValueError(f"the bernoulli likelihood takes one logit per example, got {logits.shape[-1]}")
        p = torch.sigmoid(logits[..., 0]).mean(0)
        return torch.stack([1 - p, p], dim=-1)
    return torch.softmax(logits, dim=-1).mean(0)
