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

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.app.hf import LoadedModel, encode
from flaplace.app.tasks import Example, Task, batches
from flaplace.evidence import tune_prior_evidence, tune_prior_grid
from flaplace.jacobian_cache import JacobianCache, cache_jacobians, cached_covariance
from flaplace.kfac import fit as fit_kfac
from flaplace.links import predictive_probs
from flaplace.metrics import classification_metrics
from flaplace.predictive import JacobianMethod
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
) -> tuple[Params, list[float]]:
    """MAP fine-tuning: AdamW on ``mean NLL + prior_precision / (2 n_train) * ||theta - m||^2``.

    ``theta`` are the weights named ``laplace_names`` (the posterior's blocks); other
    entries of ``params`` (e.g. a head bias) are trained without a prior. ``m`` is
    ``prior_mean`` (one tensor per name of ``laplace_names``; ``None``: zero), e.g. the
    adapters at initialisation; the posterior must then carry the same prior mean. The
    learning rate decays linearly to zero. Works on leaf copies of ``params``.

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
    bar = tqdm(range(steps), desc="MAP fine-tuning", disable=not progress, unit="step")
    for _ in bar:
        batch = next(data)
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
) -> tuple[Factors, float]:
    """K-FAC factors of the posterior's weights and the summed training log-likelihood.

    One pass over the data: adapters used at every token and a classification head used
    once per example (on pooled features) are captured in the same forward.

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
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    return factors, float(state.log_likelihood)


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


def covariances(posterior: Posterior, jacobians: Sequence[dict[str, Tensor]]) -> Tensor:
    """The logit covariances ``J Sigma J^T`` of every example, from stored Jacobians.

    Examples:
        >>> f_var = covariances(posterior, moments_of_test.jacobians)  # doctest: +SKIP
    """
    return cached_covariance(posterior, JacobianCache(torch.empty(0), list(jacobians)))


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


def tune_prior(
    posterior: Posterior,
    log_likelihood: float,
    *,
    method: str,
    validation: Callable[[], tuple[Moments, Tensor]] | None = None,
    probs: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = True,
) -> tuple[float, dict[str, Any]]:
    """The tuned prior precision and a record of the tuning.

    ``method="evidence"`` maximises the Laplace evidence; ``"grid"`` scores the
    validation NLL of the predictive (``validation()`` gives its moments and labels,
    ``probs(f_mu, f_var)`` the link) on a grid, reusing the Jacobians for every prior.

    Examples:
        >>> precision, record = tune_prior(posterior, log_likelihood, method="evidence")  # doctest: +SKIP
    """
    if method == "evidence":
        tuned, history = tune_prior_evidence(posterior, log_likelihood, progress=progress)
        record: dict[str, Any] = {"method": "evidence", "steps": len(history) - 1, "final": history[-1]}
    else:
        if validation is None or probs is None:
            raise ValueError("prior tuning by 'grid' needs the validation moments and a link")
        (f_mu, jacobians), labels = validation()

        def validation_nll(candidate: Posterior) -> float:
            return classification_metrics(probs(f_mu, covariances(candidate, jacobians)), labels)["nll"]

        tuned, table = tune_prior_grid(posterior, validation_nll, progress=progress)
        record = {"method": "grid", "table": table}
    return float(next(iter(tuned.prior_precision.values()))), record
