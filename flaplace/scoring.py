"""Multiple-choice scoring: one example is ``C`` sequences, one score (logit) per choice.

Two ways to score ``C`` answer choices, both giving ``(batch, C)`` logits that K-FAC, the
per-example Jacobians and the predictive handle like any other model function:

- **cloze scoring** with a causal language model (`ClozeModelFunction`): the logit of
  choice ``c`` is the log-probability of choice ``c``'s tokens after the prompt,
  ``sum_k log p(y_k | prompt, y_<k)``, read from the sequence ``prompt + choice_c``;
- **pair scoring** with an encoder and a multiple-choice head (e.g. Hugging Face's
  ``AutoModelForMultipleChoice``): each ``(question, choice)`` pair gets one score from the
  classifier. Such models already take ``(batch, C, tokens)`` inputs and return ``(batch, C)``
  logits, so a plain [`ModelFunction`][flaplace.params.ModelFunction] with
  [`classifier_logits`][flaplace.params.classifier_logits] is the model function; `pair_batch` builds
  the inputs.

In both, a batch holds ``(batch, C, tokens)`` tensors. Their ``attention_mask`` is 3-D, and
that is how K-FAC knows that the ``C`` sequences of one example are that example's positions:
``expand`` sums ``g g^T`` and averages ``a a^T`` over every real position of all ``C``
sequences, ``reduce`` sums the gradients and averages the inputs over them (and ``last`` does
the same over the ``C`` last positions).

The cloze score is summed over the choice's tokens by default: it is then the log-probability
of the choice's text under the model, a proper likelihood of the answer string, and a
one-token choice scores exactly its next-token log-probability. ``normalize=True`` divides by
the number of the choice's tokens instead (the "acc_norm"-style score, which favours long
choices less).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call

from flaplace.evaluation import plain_evaluation
from flaplace.params import ModelFunction, logits_of
from flaplace.typing import Batch, Params

#: Keys of a cloze batch that describe the choice tokens; they are never passed to the model.
CHOICE_KEYS: frozenset[str] = frozenset({"choice_positions", "choice_tokens", "choice_mask"})
#: Optional key of a cloze batch with baseline sequences (``unconditional=``): ``(B, C)``, the row
#: of each choice's baseline score among the example's ``2C`` sequences.
BASELINE_KEY = "choice_baseline"
_NOT_MODEL_INPUTS = CHOICE_KEYS | {BASELINE_KEY, "labels", "label", "targets"}


def cloze_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    labels: Sequence[int] | None = None,
    *,
    max_length: int | None = None,
    separator: str = " ",
    unconditional: str | None = None,
) -> dict[str, Tensor]:
    """Tokenise ``prompt + separator + choice`` for every choice of every example.

    Sequences are right-padded with the tokenizer's pad token. A sequence longer than
    ``max_length`` loses tokens from the start of its prompt (the choice is always kept whole).

    With ``unconditional`` (a context that says nothing about the question, e.g. ``"Answer:"``),
    each example gets ``C`` more sequences, ``unconditional + separator + choice``, and the logit
    of choice ``c`` becomes ``log p(choice_c | prompt) - log p(choice_c | unconditional)``: the
    pointwise mutual information of the choice and the prompt, which removes how likely a choice's
    text is by itself (fluent or short distractors). The ``2C`` sequences of an example are all
    its positions for K-FAC, and the logits stay ``(B, C)``.

    Args:
        tokenizer: a Hugging Face tokenizer (needs ``pad_token_id``).
        prompts: ``B`` prompts.
        choices: ``B`` lists of ``C`` choice texts (the same ``C`` for every example).
        labels: the index of the right choice of each example (optional).
        max_length: the most tokens a sequence keeps.
        separator: put between the prompt and the choice (a space by default, so that the
            choice is tokenised as it follows the prompt's last word).
        unconditional: the context of each choice's baseline score (see above); none by default.

    Returns:
        ``input_ids``, ``attention_mask`` ``(B, C, T)``; ``choice_positions`` (the position
        whose next-token distribution predicts each choice token), ``choice_tokens`` and
        ``choice_mask`` ``(B, C, K)`` with ``K`` the longest choice; ``labels`` ``(B,)`` if given.
        With ``unconditional`` the first five are ``(B, 2C, ...)`` (the baseline sequences
        after the example's own) and ``choice_baseline`` ``(B, C)`` holds each choice's baseline row.

    Raises:
        ValueError: mismatched lengths, an uneven number of choices, an empty choice or
            prompt, or a tokenizer without a pad token.

    Examples:
        >>> batch = cloze_batch(tok, ["The sky is"], [["blue", "green"]], [0])  # doctest: +SKIP
        >>> batch["input_ids"].shape[:2]  # doctest: +SKIP
        torch.Size([1, 2])
        >>> pmi = cloze_batch(tok, ["The sky is"], [["blue", "green"]], [0], unconditional="Answer:")  # doctest: +SKIP
        >>> pmi["input_ids"].shape[:2], pmi["choice_baseline"].tolist()  # doctest: +SKIP
        (torch.Size([1, 4]), [[2, 3]])
    """
    if len(prompts) != len(choices):
        raise ValueError(f"prompts and choices need the same length, got {len(prompts)} and {len(choices)}")
    if not prompts:
        raise ValueError("prompts is empty: cloze_batch needs at least one example")
    counts = {len(c) for c in choices}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"every example needs the same (non-zero) number of choices, got {sorted(counts)}; "
            "filter or pad the examples first"
        )
    if labels is not None and len(labels) != len(prompts):
        raise ValueError(f"labels needs one entry per prompt, got {len(labels)} for {len(prompts)}")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token first")

    def token_ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    baseline = [] if unconditional is None else [token_ids(unconditional)]
    if baseline and not baseline[0]:
        raise ValueError(f"unconditional context {unconditional!r} has no tokens")
    rows: list[tuple[list[int], int]] = []  # (token ids, number of choice tokens at the end)
    for prompt, options in zip(prompts, choices, strict=True):
        head = token_ids(prompt)
        if not head:
            raise ValueError(f"prompt {prompt!r} has no tokens: cloze scoring needs a prompt")
        tails = [token_ids(separator + option) for option in options]
        for option, tail in zip(options, tails, strict=True):
            if not tail:
                raise ValueError(f"choice {option!r} has no tokens")
        for context in [head, *baseline]:  # the example's own sequences, then its baseline ones
            for tail in tails:
                keep = len(context) if max_length is None else max(1, max_length - len(tail))
                rows.append((context[-keep:] + tail, len(tail)))
    n_choices = counts.pop()
    length = max(len(ids) for ids, _ in rows)
    width = max(k for _, k in rows)
    ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    tokens = torch.full((len(rows), width), int(pad), dtype=torch.long)
    choice_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (row, k) in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        start = len(row) - k
        positions[r, :k] = torch.arange(start - 1, len(row) - 1)
        tokens[r, :k] = torch.tensor(row[start:])
        choice_mask[r, :k] = True
    shape = (len(prompts), n_choices * (1 + len(baseline)))
    batch = {
        "input_ids": ids.reshape(*shape, length),
        "attention_mask": mask.reshape(*shape, length),
        "choice_positions": positions.reshape(*shape, width),
        "choice_tokens": tokens.reshape(*shape, width),
        "choice_mask": choice_mask.reshape(*shape, width),
    }
    if unconditional is not None:
        batch[BASELINE_KEY] = torch.arange(n_choices, 2 * n_choices).expand(len(prompts), -1).clone()
    if labels is not None:
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch


def pair_batch(
    tokenizer: Any,
    questions: Sequence[str],
    choices: Sequence[Sequence[str]],
    labels: Sequence[int] | None = None,
    *,
    max_length: int = 128,
) -> dict[str, Tensor]:
    """Tokenise ``(question, choice)`` pairs for an encoder's multiple-choice head.

    The result is what ``AutoModelForMultipleChoice`` models take: ``(B, C, T)`` tensors.

    Args:
        tokenizer: a Hugging Face tokenizer.
        questions: ``B`` questions (or contexts).
        choices: ``B`` lists of ``C`` choices (the same ``C`` for every example).
        labels: the index of the right choice of each example (optional).
        max_length: the most tokens a pair keeps (the question is truncated first).

    Returns:
        The tokenizer's tensors reshaped to ``(B, C, T)``, and ``labels`` ``(B,)`` if given.

    Raises:
        ValueError: mismatched lengths or an uneven number of choices.

    Examples:
        >>> batch = pair_batch(tok, ["the film was"], [["good", "bad"]], [0])  # doctest: +SKIP
        >>> batch["input_ids"].shape[:2]  # doctest: +SKIP
        torch.Size([1, 2])
    """
    if len(questions) != len(choices) or not questions:
        raise ValueError(
            f"questions and choices need the same non-zero length, got {len(questions)} and {len(choices)}"
        )
    counts = {len(c) for c in choices}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every example needs the same (non-zero) number of choices, got {sorted(counts)}")
    n_choices = counts.pop()
    first = [q for q, options in zip(questions, choices, strict=True) for _ in options]
    second = [o for options in choices for o in options]
    encoded = tokenizer(
        first, second, padding=True, truncation="only_first", max_length=max_length, return_tensors="pt"
    )
    batch = {k: v.reshape(len(questions), n_choices, -1) for k, v in encoded.items()}
    if labels is not None:
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch


def flatten_choices(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's inputs of a ``(B, C, ...)`` batch as ``(B*C, ...)`` rows (choice keys and labels dropped).

    Examples:
        >>> flatten_choices({"input_ids": torch.zeros(2, 3, 5, dtype=torch.long)})["input_ids"].shape
        torch.Size([6, 5])
    """
    return {k: v.flatten(0, 1) for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def cloze_scores(
    logits: Float[Tensor, "rows positions vocab"],
    batch: Mapping[str, Tensor],
    *,
    normalize: bool = False,
) -> Float[Tensor, "batch choices"]:
    """Cloze logits ``(B, C)`` from a causal LM's token logits over the ``B*C`` sequences.

    Args:
        logits: ``(B*C, T, V)`` logits at every position, or ``(B*C, K, V)`` at the
            ``choice_positions`` only (what the model returns when asked for those positions).
        batch: a batch from `cloze_batch`; with ``choice_baseline`` (``unconditional=``) it has
            ``2C`` sequences per example and each logit is a score minus its baseline's.
        normalize: divide each choice's summed log-probability by its number of tokens.

    Examples:
        >>> scores = cloze_scores(model(**flatten_choices(batch)).logits, batch)  # doctest: +SKIP
    """
    positions = batch["choice_positions"].flatten(0, 1)
    tokens = batch["choice_tokens"].flatten(0, 1)
    mask = batch["choice_mask"].flatten(0, 1)
    if logits.ndim != 3 or logits.shape[0] != positions.shape[0]:
        raise ValueError(
            f"expected token logits of shape ({positions.shape[0]}, positions, vocab) for "
            f"{tuple(batch['choice_positions'].shape[:2])} (batch, choices), got {tuple(logits.shape)}"
        )
    if logits.shape[1] != positions.shape[1] or logits.shape[1] == batch["input_ids"].shape[-1]:
        # logits at every position: pick the predicting ones (gather: its backward is one scatter)
        logits = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[-1]))
    log_probs = logits.log_softmax(-1).gather(2, tokens[:, :, None])[:, :, 0]
    weights = mask.to(log_probs.dtype)
    scores = (log_probs * weights).sum(1)
    if normalize:
        scores = scores / weights.sum(1).clamp_min(1)
    scores = scores.reshape(batch["choice_positions"].shape[:2])
    if BASELINE_KEY not in batch:
        return scores
    baseline = batch[BASELINE_KEY]
    return scores[:, : baseline.shape[1]] - scores.gather(1, baseline)


class ClozeModelFunction(ModelFunction):
    """``f(params, batch) -> (B, C)`` cloze logits of a causal LM over `cloze_batch` batches.

    The ``B*C`` sequences go through the model as one batch of rows. When the model takes
    per-example ``logits_to_keep`` positions (Hugging Face causal LMs do), only the positions
    that predict choice tokens are projected onto the vocabulary.

    Args:
        model: a causal LM (e.g. a PEFT model over ``LlamaForCausalLM``).
        params: the adapted weights (or their names).
        normalize: length-normalised scores (see `cloze_scores`); summed by default.
        trim_logits: project only the choice positions onto the vocabulary when possible.

    Examples:
        >>> f = ClozeModelFunction(peft_model, select_params(peft_model, "lora"))  # doctest: +SKIP
        >>> logits = f(params, cloze_batch(tok, prompts, choices, labels))  # (B, C)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        params: Params | Sequence[str],
        *,
        normalize: bool = False,
        trim_logits: bool = True,
    ):
        super().__init__(model, params, _ClozeOutput(normalize), trim_logits=trim_logits)
        self.normalize = normalize

    def __call__(self, params: Params, batch: Batch) -> Float[Tensor, "batch classes"]:
        if not isinstance(batch, Mapping) or not set(batch) >= CHOICE_KEYS:
            raise ValueError(
                "ClozeModelFunction needs a batch from cloze_batch (keys input_ids, attention_mask, "
                f"{', '.join(sorted(CHOICE_KEYS))})"
            )
        if batch["input_ids"].ndim != 3:
            raise ValueError(
                f"cloze input_ids must be (batch, choices, tokens), got {tuple(batch['input_ids'].shape)}"
            )
        kwargs = flatten_choices(batch)
        if self.trim_logits:
            kwargs["logits_to_keep"] = batch["choice_positions"].flatten(0, 1)
        if self.aliases:
            params = dict(params)
            for name, others in self.aliases.items():
                if name in params:
                    params.update(dict.fromkeys(others, params[name]))
        with plain_evaluation(self.model, eval_mode=self.eval_mode):  # as ModelFunction.evaluate
            output = functional_call(self.model, params, (), kwargs, tie_weights=False)
        return cloze_scores(logits_of(output), batch, normalize=self.normalize)


class _ClozeOutput:
    """Marks cloze scoring as reading a few positions (so the parent allows trimming)."""

    def __init__(self, normalize: bool):
        self.normalize = normalize

    def model_kwargs(self, batch: Batch) -> dict[str, Int[Tensor, "rows k"]]:
        assert isinstance(batch, Mapping), "cloze batches are mappings"
        return {"logits_to_keep": batch["choice_positions"].flatten(0, 1)}

    def __call__(self, output: object, batch: Batch) -> Tensor:
        assert isinstance(batch, Mapping), "cloze batches are mappings"
        return cloze_scores(logits_of(output), batch, normalize=self.normalize)
