"""The stages of a run: MAP fine-tuning, K-FAC factors, prior tuning, the test predictive.

Each stage is a function of explicit inputs (no run configuration is threaded through the
library calls beyond the options it names); [`run`][flaplace.app.pipeline.run] stores each
result with [`StageCache`][flaplace.app.checkpoints.StageCache].

MAP fine-tuning minimises, per step,

$$
\\frac{1}{|B|} \\sum_{n \\in B} -\\log p(y_n \\mid x_n, \\theta) + \\frac{\\lambda}{2N} \\lVert \\theta - m \\rVert^2
$$

with ``N`` the number of training examples, ``lambda`` the prior precision and ``m`` the prior
mean (zero, or the adapters' initialisation with ``--prior-mean init``): the MAP
objective ``-log p(D | theta) - log p(theta)`` divided by ``N``. The L2 term is written into
the loss and AdamW runs with ``weight_decay=0``: AdamW's decoupled decay is rescaled by
Adam's preconditioner and is not the gradient of a Gaussian prior, so it would not give the
MAP that the Laplace approximation expands around. The prior covers exactly the weights of
the posterior (LoRA matrices and a new head's weight); a head bias is trained without a
prior and is not part of the posterior.

Examples:
    >>> from flaplace.app.stages import train_map
    >>> trained, losses = train_map(f, params, names, batches, n_train=500, steps=200,
    ...                             lr=1e-3, prior_precision=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.app.distributed import SINGLE, all_sum, broadcast_, current_ranks, rank_seed, rows
from flaplace.app.hf import LoadedModel, encode
from flaplace.app.tasks import Example, Task, batches
from flaplace.evidence import tune_prior_evidence, tune_prior_grid
from flaplace.jacobian_cache import JacobianCache, cache_jacobians, cached_covariance
from flaplace.kfac import fit as fit_kfac
from flaplace.links import predictive_probs
from flaplace.metrics import classification_metrics
from flaplace.predictive import Directions, JacobianMethod
from flaplace.tempered_evidence import soften_by_evidence
from flaplace.tempered_validation import (
    ScalingMixture,
    mix_with_scaling,
    scaling_mixture,
    tune_prior_temperature_grid,
)
from flaplace.typing import Factors, ModelFn, Params, Posterior

#: How per-example Jacobians of token-level weights are computed (see flaplace.predictive).
JACOBIAN_METHOD: JacobianMethod = "capture"


def training_batches(
    examples: Sequence[Example], loaded: LoadedModel, task: Task, *, batch_size: int, max_length: int,
    seed: int, device: str = "cpu",
) -> Iterator[dict[str, Tensor]]:  # fmt: skip
    """Shuffled tokenised minibatches forever, reshuffled every epoch (seeded).

    Examples:
        >>> data = training_batches(train, loaded, task, batch_size=16, max_length=64, seed=0)  # doctest: +SKIP
    """
    epoch = 0
    while True:
        for chunk in batches(examples, batch_size, shuffle=True, seed=seed * 1_000_003 + epoch):
            yield encode(chunk, loaded, task, max_length=max_length, device=device)
        epoch += 1


def train_map(
    model_fn: ModelFn,
    params: Params,
    laplace_names: Sequence[str],
    data: Iterator[dict[str, Tensor]],
    *,
    n_train: int,
    steps: int,
    lr: float,
    prior_precision: float,
    progress: bool = True,
    prior_mean: Params | None = None,
    distributed: bool = False,
) -> tuple[Params, list[float]]:
    """MAP fine-tuning: AdamW on ``mean NLL + prior_precision / (2 n_train) * ||theta - m||^2``.

    ``theta`` are the weights named ``laplace_names`` (the posterior's blocks); other
    entries of ``params`` (e.g. a head bias) are trained without a prior. ``m`` is
    ``prior_mean`` (one tensor per name of ``laplace_names``; ``None``: zero), e.g. the
    adapters at initialisation; the posterior must then carry the same prior mean. The
    learning rate decays linearly to zero. Works on leaf copies of ``params``.

    ``distributed=True`` (every rank of the ``torch.distributed`` group calls it with the same
    ``data``): data parallel. Each rank takes its contiguous rows of every batch, and the
    gradients and the summed NLL are all-reduced before the step, so every rank takes the
    same step as one process would on the whole batch (to round-off).

    Returns:
        ``(trained params, loss per step)``.

    Examples:
        >>> trained, losses = train_map(f, params, names, loader_iter, n_train=500, steps=200,
        ...                             lr=1e-3, prior_precision=1.0)  # doctest: +SKIP
    """
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    optimizer = torch.optim.AdamW(leaves.values(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    scale = prior_precision / (2 * n_train)
    centre = {n: None if prior_mean is None else prior_mean[n].detach().float() for n in laplace_names}
    losses: list[float] = []
    ranks = current_ranks() if distributed else SINGLE
    if ranks.world > 1:  # every rank starts from rank 0's weights, as DistributedDataParallel does
        broadcast_(leaves.values())
    bar = tqdm(range(steps), desc="MAP fine-tuning", disable=not progress, unit="step")
    for _ in bar:
        batch = next(data)
        if ranks.world > 1:
            losses.append(
                _data_parallel_step(model_fn, leaves, laplace_names, centre, batch, optimizer, scale)
            )
            schedule.step()
            bar.set_postfix(nll=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            continue
        logits = model_fn(leaves, batch)
        nll = F.cross_entropy(logits.float(), batch["labels"])
        penalty = sum(_squared_distance(leaves[n], centre[n]) for n in laplace_names)
        loss = nll + scale * penalty
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is not finite ({float(loss)}); lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(nll.item())
        bar.set_postfix(nll=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return {n: p.detach() for n, p in leaves.items()}, losses


def _data_parallel_step(
    model_fn: ModelFn,
    leaves: dict[str, Tensor],
    laplace_names: Sequence[str],
    centre: dict[str, Tensor | None],
    batch: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    scale: float,
) -> float:
    """One MAP step on this rank's rows of ``batch``, gradients summed over ranks; the batch's mean NLL.

    Each rank's loss is its summed NLL over the whole batch's size plus its share of the
    penalty, so the sum over ranks is the one-process loss.
    """
    ranks = current_ranks()
    n = len(batch["labels"])
    local = rows(batch, ranks)
    optimizer.zero_grad(set_to_none=True)
    nll = torch.zeros((), device=batch["labels"].device)
    penalty = sum((_squared_distance(leaves[name], centre[name]) for name in laplace_names), nll)
    if len(local["labels"]):  # a batch of fewer rows than ranks leaves some ranks without one
        nll = F.cross_entropy(model_fn(leaves, local).float(), local["labels"], reduction="sum")
    (nll / n + scale * penalty / ranks.world).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves.values()]
    dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)
    flat = all_sum(torch.cat([nll.detach().reshape(1).to(dtype), *(g.reshape(-1).to(dtype) for g in grads)]))
    mean_nll = float(flat[0]) / n
    if not math.isfinite(mean_nll + scale * float(penalty.detach())):  # the same on every rank: all stop
        raise FloatingPointError(f"the training loss is not finite ({mean_nll}); lower --lr")
    offset = 1
    for p, g in zip(leaves.values(), grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    optimizer.step()
    return mean_nll


def _squared_distance(weight: Tensor, centre: Tensor | None) -> Tensor:
    delta = weight.float() if centre is None else weight.float() - centre
    return delta.square().sum()


def fit_factors(
    model_fn: ModelFn,
    params: Params,
    encoded: Sequence[dict[str, Tensor]],
    *,
    fisher: str,
    sharing: str,
    n_kfac: int,
    lr_threshold: int | None,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    distributed: bool = False,
) -> tuple[Factors, float]:
    """K-FAC factors of the posterior's weights and the summed training log-likelihood.

    One pass over the data: adapters used at every token and a classification head used
    once per example (on pooled features) are captured in the same forward.
    ``distributed=True``: ``encoded`` is this rank's share of the data, the statistics are
    summed over the ranks (every rank gets the same factors), and the Monte Carlo draws of
    ``fisher="mc"`` are seeded with the rank (`rank_seed`).

    Examples:
        >>> factors, ll = fit_factors(model_fn, map_params, train_batches, fisher="exact",
        ...                           sharing="expand", n_kfac=10, lr_threshold=None, seed=0)  # doctest: +SKIP
    """
    factors, state = fit_kfac(
        model_fn,
        params,
        encoded,
        progress=progress,
        fisher=cast(Any, fisher),
        sharing=cast(Any, sharing),
        n_kfac=n_kfac,
        lr_threshold=lr_threshold,
        generator=torch.Generator(device=device).manual_seed(
            rank_seed(seed, current_ranks() if distributed else SINGLE)
        ),
        distributed=distributed,
    )
    return factors, float(state.log_likelihood)


def soften_factors(
    model_fn: ModelFn,
    params: Params,
    encoded: Sequence[dict[str, Tensor]],
    posterior: Posterior,
    log_likelihood: float,
    *,
    fisher: str,
    sharing: str,
    n_kfac: int,
    lr_threshold: int | None,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    distributed: bool = False,
) -> tuple[Factors, float, dict[str, Any]]:
    """The prior ``"default"``: ``lambda`` and a softening temperature ``T >= 1`` by the evidence.

    ``posterior`` and ``log_likelihood`` are the untempered fit of `fit_factors` on ``encoded``
    with the same options; ``T`` climbs 2, 4, 8, 16 while the evidence rises and the training
    log-likelihood gains more than ``log(N) / 2``, one K-FAC pass each
    ([`soften_by_evidence`][flaplace.tempered_evidence.soften_by_evidence]). Returns the factors of
    ``f / T`` (the given ones at ``T = 1``), the prior precision and a record (``temperature``,
    the tempered ``log_likelihood``, the climb's ``table``).

    Examples:
        >>> factors, precision, record = soften_factors(model_fn, map_params, train_batches, posterior,
        ...     ll, fisher="exact", sharing="expand", n_kfac=10, lr_threshold=None, seed=0)  # doctest: +SKIP
    """
    generator = torch.Generator(device=device).manual_seed(
        rank_seed(seed + 1, current_ranks() if distributed else SINGLE)  # not the T = 1 pass's draws
    )
    best, table = soften_by_evidence(
        model_fn, params, encoded, posterior, torch.tensor(log_likelihood, dtype=torch.float64),
        progress=progress, fisher=cast(Any, fisher), sharing=cast(Any, sharing), n_kfac=n_kfac,
        lr_threshold=lr_threshold, generator=generator, distributed=distributed,
    )  # fmt: skip
    record = {"method": "default", "temperature": best.temperature, "log_likelihood": float(best.log_likelihood),
              "final": {"log_evidence": best.log_evidence}, "table": table}  # fmt: skip
    return best.posterior.factors, float(next(iter(best.posterior.prior_precision.values()))), record


#: The logits and per-batch Jacobians of a split (kept to score many priors).
Moments: TypeAlias = JacobianCache


def moments(
    model_fn: ModelFn,
    posterior: Posterior,
    encoded: Sequence[dict[str, Tensor]],
    *,
    progress: bool,
    desc: str,
) -> JacobianCache:
    """MAP logits of every batch and the per-batch Jacobians.

    The capture method covers the adapters (used at every token) and a classification head
    (used once per example, on pooled features) in the same forward pass.

    Examples:
        >>> f_mu, jacobians = moments(f, posterior, test_batches, progress=False, desc="")  # doctest: +SKIP
    """
    return cache_jacobians(
        model_fn, posterior.mean, encoded, method=JACOBIAN_METHOD, progress=progress, desc=desc
    )


def covariances(
    posterior: Posterior, jacobians: Sequence[dict[str, Tensor]], directions: Directions = "all"
) -> Tensor:
    """The logit covariances ``J Sigma J^T`` of every example, from stored Jacobians.

    ``directions``: ``"all"`` (the whole posterior) or ``"informed"`` (see
    [`predictive_precompute`][flaplace.predictive.predictive_precompute]).

    Examples:
        >>> f_var = covariances(posterior, moments_of_test.jacobians, "informed")  # doctest: +SKIP
    """
    return cached_covariance(posterior, JacobianCache(torch.empty(0), list(jacobians)), directions)


def link_probs(f_mu: Tensor, f_var: Tensor, *, link: str, n_samples: int, seed: int) -> Tensor:
    """Class probabilities of the linearised predictive through ``link`` (in float64).

    Examples:
        >>> link_probs(torch.zeros(1, 2), torch.zeros(1, 2, 2), link="probit", n_samples=1, seed=0)
        tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """
    generator = torch.Generator(device=f_mu.device).manual_seed(seed)
    probs = predictive_probs(
        f_mu.double(), f_var.double(), link=cast(Any, link), n_samples=n_samples, generator=generator
    )
    return probs.detach()


def run_probs(
    f_mu: Tensor, f_var: Tensor, results: dict[str, Any], *, link: str, n_samples: int, seed: int
) -> Tensor:
    """A run's Laplace probabilities from its logit moments and its record (``results.json``).

    The predictive of the logits over the run's temperature, ``N(f_mu / T, f_var / T^2)``,
    through ``link``; for ``default-val`` averaged with temperature scaling of the MAP by the
    record's Akaike weight (``prior_tuning.scaling_weight``).

    Examples:
        >>> run_probs(torch.zeros(1, 2), torch.zeros(1, 2, 2), {"temperature": 1.0, "prior_tuning": {}},
        ...           link="probit", n_samples=1, seed=0)
        tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """
    t, tuning = float(results.get("temperature", 1.0)), results.get("prior_tuning", {})
    probs = link_probs(f_mu / t, f_var / t**2, link=link, n_samples=n_samples, seed=seed)
    if "scaling_weight" not in tuning:
        return probs
    mixture = ScalingMixture(tuning["scaling_weight"], tuning["scaling_temperature"])
    return mix_with_scaling(probs, f_mu.double().to(probs.device), mixture)


def tune_prior(
    posterior: Posterior,
    log_likelihood: float,
    *,
    method: str,
    validation: Callable[[], tuple[Moments, Tensor]] | None = None,
    probs: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = True,
    distributed: bool = False,
    directions: Directions = "all",
) -> tuple[float, dict[str, Any]]:
    """The tuned prior precision and a record of the tuning (with the likelihood ``temperature``).

    ``directions``: the predictive covariance the validation NLL scores (see `covariances`).

    ``method="evidence"`` maximises the Laplace evidence (temperature 1; ``"default"``, the
    evidence over a temperature too, needs K-FAC passes: `soften_factors`);
    ``"grid"`` scores the validation NLL of the predictive (``validation()`` gives its moments
    and labels, ``probs(f_mu, f_var)`` the link) on a grid of prior precisions, reusing the
    Jacobians for every prior; ``"default-val"`` scores ``(lambda, T)`` jointly, the predictive
    ``N(f_mu / T, f_var / T^2)``, temperature scaling of the MAP included
    ([`tune_prior_temperature_grid`][flaplace.tempered_validation.tune_prior_temperature_grid]);
    its record adds the Akaike weight of that posterior against temperature scaling
    (``scaling_weight``, ``scaling_temperature``: see
    [`scaling_mixture`][flaplace.tempered_validation.scaling_mixture]).
    ``distributed=True``: ``validation()`` gives this rank's share of the validation set, and
    each candidate's NLL is averaged over all ranks' examples (the evidence needs nothing:
    every rank holds the summed factors).

    Examples:
        >>> precision, record = tune_prior(posterior, log_likelihood, method="evidence")  # doctest: +SKIP
    """
    if method == "evidence":
        tuned, history = tune_prior_evidence(posterior, log_likelihood, progress=progress)
        record: dict[str, Any] = {"method": method, "steps": len(history) - 1, "final": history[-1]}
        return float(next(iter(tuned.prior_precision.values()))), {**record, "temperature": 1.0}
    if validation is None or probs is None:
        raise ValueError(f"prior tuning by {method!r} needs the validation moments and a link")
    (f_mu, jacobians), labels = validation()

    def nll_of(f_var: Tensor, temperature: float = 1.0) -> float:
        nll = classification_metrics(probs(f_mu / temperature, f_var / temperature**2), labels)["nll"]
        if not distributed:
            return nll
        total = all_sum(torch.tensor([nll * len(labels), len(labels)], dtype=torch.float64))
        return float(total[0] / total[1])

    if method == "grid":
        tuned, table = tune_prior_grid(
            posterior,
            lambda candidate: nll_of(covariances(candidate, jacobians, directions)),
            progress=progress,
        )
        return float(next(iter(tuned.prior_precision.values()))), {
            "method": "grid",
            "table": table,
            "temperature": 1.0,
        }

    def nll_at(candidate: Posterior) -> Callable[[float], float]:
        f_var = covariances(candidate, jacobians, directions)  # once per prior precision
        return lambda temperature: nll_of(f_var, temperature)

    tuned, temperature, table = tune_prior_temperature_grid(posterior, nll_at, progress=progress)
    n_examples = int(all_sum(torch.tensor(float(len(labels))))) if distributed else len(labels)
    scaling = scaling_mixture(table, n_examples)
    precision = float(next(iter(tuned.prior_precision.values())))
    return precision, {"method": method, "table": table, "temperature": temperature,
                       "scaling_weight": scaling.weight, "scaling_temperature": scaling.temperature}  # fmt: skip


def map_logits(model_fn: ModelFn, params: Params, encoded: Sequence[dict[str, Tensor]]) -> Tensor:
    """The MAP's logits on every batch, concatenated (a forward pass, no Jacobians).

    Examples:
        >>> logits = map_logits(f, map_params, validation_batches)  # doctest: +SKIP
    """
    with torch.no_grad():
        return torch.cat([model_fn(params, batch).detach() for batch in encoded])
