"""Held-out completions of a generatively fine-tuned causal LM: token and sequence NLL, mutual information.

For text in Hugging Face's causal-LM convention (``labels`` of the inputs' shape, unshifted,
``-100`` where no loss is taken; see [`flaplace.tokens`][flaplace.tokens]), each supervised token
``y_t`` is predicted by the logits ``f_t`` of the position before it. Three predictives of a
supervised token:

* **MAP**: ``softmax(f_t(theta*))``; the mean token NLL is the model's own SFT loss.
* **Temperature scaling**: ``softmax(f_t(theta*) / T)`` with ONE temperature ``T`` for every token
  (fitted by [`fit_temperature`][flaplace.temperature.fit_temperature] on validation tokens); ``T = 1`` is the MAP.
* **Posterior** (`token_predictive`): the linearised model ``f_t + J_t delta_s`` at ``S`` weight
  perturbations ``delta_s`` drawn from the Laplace posterior (or its informed directions, see
  [`sample_perturbations`][flaplace.vocabulary.sample_perturbations]); ``p_t = mean_s p_{s,t}``
  with ``p_{s,t} = softmax((f_t + J_t delta_s) / T)`` over the whole vocabulary. Only the
  predicting positions are computed (with `SupervisedTokenLogits`, only those positions are
  projected onto the vocabulary), one forward-mode ``jvp`` per sample.

Per token: the NLL ``-log p_t[y_t]`` and the mutual information between the token and the weights,
``H[p_t] - mean_s H[p_{s,t}]``. Per sequence (one example's supervised tokens):

* ``sequence NLL`` of the MAP or temperature: the sum of its tokens' NLLs;
* of the posterior, two readings: the *joint* predictive
  ``-log mean_s prod_t p_{s,t}[y_t]`` (each sample is one model for the whole completion; what
  `sequence_log_predictive` returns), and the *token-wise* product ``-sum_t log p_t[y_t]``
  (`sequence_sum`), which treats the tokens' predictives as independent;
* the sequence mutual information: the sum of its tokens' (`sequence_sum`).

Examples:
    >>> import torch
    >>> example = torch.tensor([0, 0, 1])  # two supervised tokens in example 0, one in example 1
    >>> sequence_sum(torch.tensor([0.5, 1.0, 2.0]), example, 2)
    tensor([1.5000, 2.0000])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from flaplace.params import logits_of
from flaplace.predictive import Directions
from flaplace.tokens import predicting_mask, supervised_rows, supervised_targets, token_labels
from flaplace.typing import Batch, ModelFn, Params, Posterior
from flaplace.vocabulary import (
    accumulate_samples,
    check_sampling_options,
    linearised_logits,
    sample_perturbations,
)

__all__ = [
    "SupervisedTokens",
    "TokenPredictive",
    "map_token_log_probs",
    "sequence_log_predictive",
    "sequence_sum",
    "supervised_tokens",
    "token_log_probs",
    "token_predictive",
]


class SupervisedTokens(NamedTuple):
    """The supervised tokens of a batch, in the row order of `SupervisedTokenLogits`.

    Attributes:
        targets: ``(n_supervised,)`` the supervised token ids.
        example: ``(n_supervised,)`` the batch row each belongs to.
        mask: ``(batch, tokens)`` the predicting positions (``labels[:, t + 1] != -100``, real).
    """

    targets: Tensor
    example: Tensor
    mask: Tensor


def supervised_tokens(batch: Batch) -> SupervisedTokens:
    """The supervised tokens of a batch with causal-LM token labels, and which example each is in.

    Raises:
        ValueError: a batch without token labels (``labels`` of the shape of ``input_ids``).

    Examples:
        >>> import torch
        >>> batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([[-100, 4, 5], [-100, -100, 6]])}
        >>> supervised_tokens(batch).example
        tensor([0, 0, 1])
    """
    labels = token_labels(batch)
    if labels is None:
        raise ValueError(
            "the batch needs causal-LM token labels: a mapping with 'labels' of the shape of its "
            "'input_ids' (-100 where no loss is taken)"
        )
    real = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    mask = predicting_mask(labels, real)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    return SupervisedTokens(supervised_targets(labels, mask), rows[mask], mask)


def _rows(logits: Tensor, tokens: SupervisedTokens) -> Tensor:
    return supervised_rows(logits, tokens.mask, "the model function")


def token_log_probs(
    rows: Float[Tensor, "supervised vocab"],
    targets: Int[Tensor, " supervised"],
    temperature: float | Tensor = 1.0,
) -> Float[Tensor, " supervised"]:
    """``log softmax(rows / T)[target]`` per supervised token (in float32 or wider).

    Examples:
        >>> import torch
        >>> token_log_probs(torch.zeros(2, 4), torch.tensor([0, 3]))  # uniform over 4 tokens
        tensor([-1.3863, -1.3863])
    """
    wide = rows.to(torch.promote_types(rows.dtype, torch.float32)) / temperature
    return torch.log_softmax(wide, -1).gather(-1, targets.to(rows.device)[:, None])[:, 0]


@torch.no_grad()
def map_token_log_probs(
    model_fn: ModelFn, params: Params, batch: Batch, temperature: float | Tensor = 1.0
) -> tuple[Float[Tensor, " supervised"], SupervisedTokens]:
    """The MAP (or temperature-scaled) log-probability of every supervised token of a batch.

    ``-log_probs.mean()`` is the model's own SFT loss on the batch (Hugging Face averages the
    cross-entropy over the supervised tokens) at ``temperature=1``.

    Args:
        model_fn: ``f(params, batch)`` returning the supervised rows ``(n_supervised, vocab)``
            (`SupervisedTokenLogits`) or every position's logits ``(batch, tokens, vocab)``.
        params: the adapter weights (the MAP).
        batch: ``input_ids``, ``attention_mask``, token ``labels``.
        temperature: ``T``; the logits are divided by it.

    Returns:
        ``(log_probs (n_supervised,), tokens)``, the rows in `supervised_tokens` order.

    Examples:
        >>> f = ModelFunction(peft_model, params, SupervisedTokenLogits())
        >>> log_probs, tokens = map_token_log_probs(f, params, batch)
    """
    tokens = supervised_tokens(batch)
    rows = _rows(logits_of(model_fn(params, batch)), tokens)
    return token_log_probs(rows, tokens.targets, temperature), tokens


class TokenPredictive(NamedTuple):
    """The posterior predictive of every supervised token of a batch, from ``S`` linearised samples.

    Rows are the supervised tokens in `supervised_tokens` order.

    Attributes:
        targets: ``(n,)`` the supervised token ids.
        example: ``(n,)`` the batch row of each.
        log_predictive: ``(n,)`` ``log p_t[y_t]`` with ``p_t = mean_s softmax((f_t + J_t delta_s) / T)``.
        sample_log_probs: ``(S, n)`` ``log p_{s,t}[y_t]`` per sample.
        map_log_probs: ``(n,)`` ``log softmax(f_t / T)[y_t]`` at ``theta*``.
        entropy: ``(n,)`` ``H[p_t]`` (nats).
        aleatoric: ``(n,)`` ``mean_s H[p_{s,t}]``.
        mutual_information: ``(n,)`` ``H[p_t] - mean_s H[p_{s,t}]`` (clamped at 0 against round-off).
        map_entropy: ``(n,)`` ``H[softmax(f_t / T)]``.
    """

    targets: Tensor
    example: Tensor
    log_predictive: Tensor
    sample_log_probs: Tensor
    map_log_probs: Tensor
    entropy: Tensor
    aleatoric: Tensor
    mutual_information: Tensor
    map_entropy: Tensor


def _entropy(log_p: Tensor) -> Tensor:
    return -(log_p.exp() * log_p).sum(-1)


@torch.no_grad()
def token_predictive(
    model_fn: ModelFn,
    posterior: Posterior,
    batch: Batch,
    n_samples: int = 16,
    *,
    directions: Directions = "all",
    temperature: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 8,
    perturbations: Params | None = None,
) -> TokenPredictive:
    """The linearised posterior predictive of every supervised token of a batch, over the whole vocabulary.

    Draws ``S`` perturbations ``delta_s`` (`sample_perturbations`; ``directions="all"``: from the
    Laplace posterior ``N(0, Sigma)``; ``"informed"``: only along the eigen-directions where the
    data outweigh the prior, the covariance that the classification predictive uses with
    ``predictive_precompute(posterior, directions="informed")``), and for each one ``jvp`` of
    ``model_fn`` at ``posterior.mean`` gives the linearised logits ``f_t + J_t delta_s`` of every
    predicting position. Their softmaxes (after dividing by ``temperature``) are averaged into
    ``p_t``. Samples go ``chunk_size`` at a time; nothing larger than
    ``chunk_size x n_supervised x vocab`` is formed.

    Args:
        model_fn: ``f(params, batch)`` returning the supervised rows ``(n_supervised, vocab)``
            (``ModelFunction(model, params, SupervisedTokenLogits())``: only those positions are
            projected onto the vocabulary) or every position's logits ``(batch, tokens, vocab)``.
        posterior: from [`make_posterior`][flaplace.make_posterior], e.g. fitted on token labels.
        batch: ``input_ids``, ``attention_mask`` and causal-LM token ``labels`` (``-100``: no loss).
        n_samples: ``S`` (ignored with ``perturbations``).
        directions: ``"all"`` or ``"informed"`` (ignored with ``perturbations``).
        temperature: ``T``, dividing the linearised logits (1: the plain likelihood).
        generator: a ``torch.Generator`` on the factors' device, for reproducible draws.
        chunk_size: samples per vectorised ``jvp``; ``None``: all at once.
        perturbations: pre-drawn ``delta_s`` (leaves ``(S, *param.shape)``), e.g. the same
            linearised models for every batch of a test set.

    Returns:
        A `TokenPredictive`.

    Raises:
        ValueError: a batch without token labels, logits that fit neither reading, bad
            ``n_samples``/``chunk_size``/``directions``.

    Examples:
        >>> f = ModelFunction(peft_model, params, SupervisedTokenLogits())
        >>> pred = token_predictive(f, posterior, batch, 16, generator=torch.Generator().manual_seed(0))
        >>> token_nll = -pred.log_predictive.mean()
        >>> sequence_mi = sequence_sum(pred.mutual_information, pred.example, batch["input_ids"].shape[0])
    """
    n_samples = check_sampling_options(n_samples, chunk_size, perturbations, directions)
    tokens = supervised_tokens(batch)
    targets = tokens.targets
    size = n_samples if chunk_size is None else chunk_size
    prob_sum: Tensor | None = None
    entropy_sum: Tensor | None = None
    sample_rows: list[Tensor] = []
    map_log_p: Tensor | None = None
    for start in range(0, n_samples, size):
        stop = min(n_samples, start + size)
        if perturbations is not None:
            deltas = {k: v[start:stop] for k, v in perturbations.items()}
        else:  # sample k depends only on the generator's state before it, whatever the chunks
            deltas = sample_perturbations(posterior, stop - start, generator, directions=directions)
        primal, tangents = linearised_logits(model_fn, posterior.mean, batch, deltas)
        primal = _rows(primal, tokens)
        wide = torch.promote_types(primal.dtype, torch.float32)
        if tangents.ndim == 4:  # every position: keep the predicting ones
            tangents = tangents[:, tokens.mask.to(tangents.device)]
        if map_log_p is None:
            map_log_p = torch.log_softmax(primal.to(wide) / temperature, -1)
            targets = targets.to(primal.device)
        log_p = torch.log_softmax((tangents.to(wide) + primal.to(wide)) / temperature, -1)
        del tangents
        entropy_sum, prob_sum = accumulate_samples(log_p, entropy_sum, prob_sum)
        sample_rows.append(log_p.gather(-1, targets.expand(log_p.shape[0], -1)[..., None])[..., 0])
        del log_p
    assert prob_sum is not None and entropy_sum is not None and map_log_p is not None
    probs = prob_sum.div_(n_samples)
    tiny = torch.finfo(probs.dtype).tiny
    entropy = _entropy(torch.log(probs.clamp(min=tiny)))
    aleatoric = entropy_sum / n_samples
    return TokenPredictive(
        targets=targets,
        example=tokens.example.to(probs.device),
        log_predictive=torch.log(probs.gather(-1, targets[:, None])[:, 0].clamp(min=tiny)),
        sample_log_probs=torch.cat(sample_rows),
        map_log_probs=map_log_p.gather(-1, targets[:, None])[:, 0],
        entropy=entropy,
        aleatoric=aleatoric,
        mutual_information=(entropy - aleatoric).clamp(min=0),
        map_entropy=_entropy(map_log_p),
    )


def sequence_sum(
    values: Float[Tensor, "*samples supervised"], example: Int[Tensor, " supervised"], n_examples: int
) -> Float[Tensor, "*samples examples"]:
    """Sum per-token values over each example's supervised tokens (0 for an example without any).

    Use it for the sequence NLL of the MAP (``-sequence_sum(map_log_probs, ...)``), the token-wise
    posterior product, or the sequence mutual information.

    Examples:
        >>> import torch
        >>> sequence_sum(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([1, 1, 0]), 3)
        tensor([[4., 3., 0.]])
    """
    shape = (*values.shape[:-1], n_examples)
    out = values.new_zeros(shape)
    return out.index_add_(-1, example.to(values.device), values)


def sequence_log_predictive(
    sample_log_probs: Float[Tensor, "samples supervised"],
    example: Int[Tensor, " supervised"],
    n_examples: int,
) -> Float[Tensor, " examples"]:
    """The joint predictive log-probability of each example's completion: ``log mean_s prod_t p_{s,t}[y_t]``.

    Each sample is one model for the whole completion (as `sequence_scores`' ``log_mean_prob``).

    Examples:
        >>> import torch
        >>> two_samples = torch.log(torch.tensor([[0.5, 0.5], [1.0, 1.0]]))  # one example, two tokens
        >>> sequence_log_predictive(two_samples, torch.tensor([0, 0]), 1).exp()  # (0.25 + 1) / 2
        tensor([0.6250])
    """
    per_sample = sequence_sum(sample_log_probs, example, n_examples)
    return torch.logsumexp(per_sample, 0) - math.log(per_sample.shape[0])
