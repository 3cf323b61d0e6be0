"""Scoring and decoding token sequences under the posterior, by forward-mode sampling.

Built on [`vocabulary_predictive`][flaplace.vocabulary.vocabulary_predictive]: the predictive
log-likelihood of a given continuation (free-form answers, cloze multiple choice) with its
spread over posterior samples, and greedy or sampled decoding from the linearised predictive
with per-token entropy and mutual information.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from flaplace.predictive import Directions
from flaplace.typing import ModelFn, Posterior
from flaplace.vocabulary import IGNORE_INDEX, sample_perturbations, vocabulary_predictive

# --------------------------------------------------------------------------- sequence scoring


def continuation_targets(
    input_ids: Int[Tensor, "batch tokens"], answer_mask: Bool[Tensor, "batch tokens"] | Tensor
) -> Int[Tensor, "batch tokens"]:
    """The targets that score the answer tokens: ``targets[:, t] = input_ids[:, t + 1]`` where ``t + 1`` is an answer token.

    Position ``t``'s logits predict token ``t + 1``, so the answer's first token is predicted
    by the prompt's last position. Everything else is `IGNORE_INDEX`.

    Examples:
        >>> continuation_targets(torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 1]]))
        tensor([[   6,    7, -100]])
    """
    if input_ids.shape != answer_mask.shape:
        raise ValueError(
            f"answer_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(answer_mask.shape)}"
        )
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    nxt = answer_mask[:, 1:].bool()
    targets[:, :-1] = torch.where(nxt, input_ids[:, 1:], IGNORE_INDEX)
    return targets


class SequenceScores(NamedTuple):
    """Predictive scores of answer sequences (one per example), from ``S`` linearised samples.

    Attributes:
        samples: ``(samples, batch)``, ``log p_s(answer | prompt)`` per sample, the sum over the
            answer's tokens (divided by their count with ``normalise=True``).
        mean: ``(batch,)``, the mean of ``samples``.
        std: ``(batch,)``, their standard deviation (the uncertainty of the score).
        log_mean_prob: ``(batch,)``, ``log mean_s exp(samples)``: the log predictive probability
            of the whole answer when each sample is one model.
        token_predictive: ``(batch,)``, ``sum_t log p_t[answer_t]`` with the per-token predictive
            ``p_t = mean_s p_{s,t}`` (divided by the count with ``normalise=True``).
        num_tokens: ``(batch,)``, answer tokens per example.
        mutual_information: ``(batch,)``, the summed per-token mutual information over the
            answer's predicted positions.
        map_score: ``(batch,)``, the answer's log-likelihood at ``theta*`` (the MAP model), divided
            by the count with ``normalise=True``.
    """

    samples: Tensor
    mean: Tensor
    std: Tensor
    log_mean_prob: Tensor
    token_predictive: Tensor
    num_tokens: Tensor
    mutual_information: Tensor
    map_score: Tensor


def sequence_scores(
    model_fn: ModelFn,
    posterior: Posterior,
    batch: Mapping[str, Tensor],
    answer_mask: Int[Tensor, "batch tokens"] | Bool[Tensor, "batch tokens"],
    n_samples: int = 16,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 8,
    normalise: bool = False,
    directions: Directions = "all",
) -> SequenceScores:
    """The predictive log-likelihood of answer sequences after prompts, with its uncertainty.

    Each row of ``batch["input_ids"]`` is a prompt followed by an answer, ``answer_mask`` marks
    the answer's tokens (padding, left or right, must be masked out of it and out of
    ``attention_mask``). With the linearised logits ``f + J delta_s`` of ``S`` posterior samples,
    sample ``s`` scores the answer by ``sum_t log p_s(answer_t | prompt, answer_<t)``.
    For cloze multiple choice, put each (question, choice) pair in its own row and compare the
    rows of one question.

    Args:
        model_fn: ``f(params, batch) -> logits (batch, tokens, vocab)`` (`all_logits`).
        posterior: from [`make_posterior`][flaplace.make_posterior].
        batch: ``input_ids`` and optionally ``attention_mask``.
        answer_mask: ``(batch, tokens)``, 1 on the answer tokens.
        n_samples: the number of samples ``S``.
        generator: a ``torch.Generator``, for reproducibility.
        chunk_size: samples per vectorised ``jvp`` (see `vocabulary_predictive`).
        normalise: divide each sequence's log-likelihood by its number of answer tokens.
        directions: the posterior the samples are drawn from, ``"all"`` or ``"informed"`` (see
            [`sample_perturbations`][flaplace.vocabulary.sample_perturbations]).

    Returns:
        A `SequenceScores`.

    Examples:
        >>> scores = sequence_scores(f, posterior, batch, answer_mask, 16, generator=torch.Generator().manual_seed(0))
        >>> scores.mean, scores.std  # (batch,) each
    """
    if "input_ids" not in batch:
        raise ValueError("batch needs 'input_ids' (prompt followed by answer tokens)")
    targets = continuation_targets(batch["input_ids"], answer_mask)
    pred = vocabulary_predictive(
        model_fn,
        posterior,
        batch,
        n_samples,
        targets=targets,
        generator=generator,
        chunk_size=chunk_size,
        directions=directions,
    )
    assert pred.target_log_probs is not None and pred.log_predictive is not None
    assert pred.map_log_probs is not None
    keep = targets != IGNORE_INDEX
    count = keep.sum(-1)
    if bool((count == 0).any()):
        raise ValueError("answer_mask marks no answer token after the first position in some row")
    denominator = count.to(pred.probs.dtype) if normalise else torch.ones_like(count, dtype=pred.probs.dtype)
    samples = pred.target_log_probs.sum(-1) / denominator
    s = samples.shape[0]
    return SequenceScores(
        samples=samples,
        mean=samples.mean(0),
        std=samples.std(0, correction=1) if s > 1 else torch.zeros_like(samples[0]),
        log_mean_prob=torch.logsumexp(samples, 0) - math.log(s),
        token_predictive=pred.log_predictive.sum(-1) / denominator,
        num_tokens=count,
        mutual_information=(pred.mutual_information * keep).sum(-1),
        map_score=pred.map_log_probs.sum(-1) / denominator,
    )


# --------------------------------------------------------------------------- linearised decoding


class Decoded(NamedTuple):
    """Tokens chosen by uncertainty-aware decoding, with per-token uncertainty.

    Attributes:
        tokens: ``(new,)``, the generated token ids.
        entropy: ``(new,)``, ``H[p]`` of the predictive each token was chosen from.
        aleatoric: ``(new,)``, ``mean_s H[p_s]``.
        mutual_information: ``(new,)``, the epistemic part ``H[p] - mean_s H[p_s]``.
        prob: ``(new,)``, the predictive probability of the chosen token.
    """

    tokens: Tensor
    entropy: Tensor
    aleatoric: Tensor
    mutual_information: Tensor
    prob: Tensor


def linearised_decode(
    model_fn: ModelFn,
    posterior: Posterior,
    input_ids: Int[Tensor, "batch tokens"],
    *,
    max_new_tokens: int = 20,
    n_samples: int = 8,
    generator: torch.Generator | None = None,
    do_sample: bool = False,
    eos_token_id: int | None = None,
    chunk_size: int | None = None,
    directions: Directions = "all",
) -> Decoded:
    """Decode one prompt with the linearised predictive: at each step average ``S`` jvp samples' probabilities.

    ``S`` perturbations are drawn once, so each sample is one linearised model for the whole
    text; at each step the next token is the predictive's most probable one (``do_sample=False``)
    or drawn from it with ``generator``. There is no key/value cache (the jvp re-runs the
    prompt and the text so far at every step), so a step costs one jvp over the whole sequence.

    Args:
        model_fn: ``f(params, {"input_ids": ids}) -> logits (1, tokens or 1, vocab)`` whose final
            position predicts the next token, e.g. ``ModelFunction(model, params, NextTokenLogits())``.
        posterior: from [`make_posterior`][flaplace.make_posterior].
        input_ids: ``(1, tokens)``, the prompt.
        max_new_tokens: the most tokens to generate.
        n_samples: the number of samples ``S``.
        generator: a ``torch.Generator`` for the perturbations and, with ``do_sample``, the tokens.
        do_sample: draw each token from the predictive instead of taking the most probable.
        eos_token_id: stop after this token.
        chunk_size: samples per vectorised jvp (``None``: all at once).
        directions: the posterior the perturbations are drawn from, ``"all"`` or ``"informed"``
            (see [`sample_perturbations`][flaplace.vocabulary.sample_perturbations]).

    Examples:
        >>> f = ModelFunction(peft_model, params, NextTokenLogits())
        >>> out = linearised_decode(f, posterior, tok("Hello", return_tensors="pt").input_ids, n_samples=8)
        >>> out.tokens, out.mutual_information
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one prompt of shape (1, tokens), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    deltas = sample_perturbations(posterior, n_samples, generator, directions=directions)
    ids = input_ids
    rows: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []
    for _ in range(max_new_tokens):
        pred = vocabulary_predictive(
            model_fn, posterior, {"input_ids": ids}, perturbations=deltas, chunk_size=chunk_size
        )
        probs = pred.probs[0, -1]
        token = torch.multinomial(probs, 1, generator=generator)[0] if do_sample else probs.argmax()
        rows.append(
            (
                token,
                pred.entropy[0, -1],
                pred.aleatoric[0, -1],
                pred.mutual_information[0, -1],
                probs[token],
            )
        )
        ids = torch.cat([ids, token.view(1, 1).to(ids.device)], dim=1)
        if eos_token_id is not None and int(token) == eos_token_id:
            break
    tokens, entropy, aleatoric, mi, prob = (torch.stack(col) for col in zip(*rows, strict=True))
    return Decoded(tokens=tokens, entropy=entropy, aleatoric=aleatoric, mutual_information=mi, prob=prob)
