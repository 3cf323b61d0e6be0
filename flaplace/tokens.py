"""Token-level likelihood of a causal language model trained on token labels (supervised fine-tuning).

A causal LM fine-tuned generatively is trained on ``labels`` of the inputs' shape ``(batch, tokens)``,
in Hugging Face's convention: the labels as passed to a ``*ForCausalLM``, *not* shifted (the logits at
position ``t - 1`` predict the label at ``t``), with ``-100`` (`IGNORE_INDEX`) wherever no loss is taken
(the prompt, the padding). The likelihood is categorical over the vocabulary at every supervised
token, and the training log-likelihood is the summed log-probability of the supervised tokens.

For K-FAC, each *predicting* position (a position whose next label is supervised) is one of its
example's positions; every other position (prompt, padding, trailing tokens) adds nothing.
`SupervisedTokenLogits` is the output function that returns
the logits of the predicting positions only, one row per supervised token, and asks a Hugging Face
model (``logits_to_keep``) to project only those positions onto the vocabulary.

Examples:
    >>> import torch
    >>> labels = torch.tensor([[-100, -100, 7, 9]])  # the prompt is 2 tokens; 7 and 9 are supervised
    >>> predicting_mask(labels)  # position 1 predicts 7, position 2 predicts 9
    tensor([[False,  True,  True, False]])
    >>> supervised_targets(labels, predicting_mask(labels))
    tensor([7, 9])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from flaplace.params import logits_of
from flaplace.typing import Batch

#: Label value that marks a token without a loss (Hugging Face's convention).
IGNORE_INDEX = -100

#: The largest vocabulary for which ``fisher="exact"`` is accepted on token labels: the exact
#: GGN needs ``vocab - 1`` pull-backs per supervised token (use ``fisher="mc"`` above it).
MAX_EXACT_VOCABULARY = 256

#: Rows of ``(rows, vocab)`` tensors handled at once by the row-wise helpers (softmax, sampling,
#: log-likelihood): their temporaries stay ``CHUNK_ROWS x vocab`` whatever the number of tokens.
CHUNK_ROWS = 64


def token_labels(batch: Batch) -> Int[Tensor, "batch tokens"] | None:
    """The batch's causal-LM token labels, or ``None`` when it has none.

    Token labels are an integer ``labels`` entry of a mapping with the shape of its ``input_ids``
    (``(batch, tokens)``); class labels ``(batch,)`` are not.

    Examples:
        >>> import torch
        >>> token_labels({"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)}).shape
        torch.Size([2, 3])
        >>> token_labels({"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}) is None
        True
    """
    if not isinstance(batch, Mapping):
        return None
    labels, ids = batch.get("labels"), batch.get("input_ids")
    if not isinstance(labels, Tensor) or not isinstance(ids, Tensor):
        return None
    if (
        labels.ndim != 2
        or labels.shape != ids.shape
        or labels.dtype.is_floating_point
        or labels.dtype == torch.bool
    ):
        return None
    return labels


def predicting_mask(
    labels: Int[Tensor, "batch tokens"], real: Tensor | None = None
) -> Bool[Tensor, "batch tokens"]:
    """The positions whose logits predict a supervised label: ``labels[:, t + 1] != -100``.

    Args:
        labels: Hugging Face causal-LM labels (unshifted, `IGNORE_INDEX` = no loss).
        real: ``(batch, tokens)`` real positions (the attention mask); a label counts only when
            both its own position and the position that predicts it are real, so a left-padded
            first token (predicted from padding) is not supervised.

    Returns:
        ``(batch, tokens)`` bool; the final position is never predicting (nothing follows it).

    Examples:
        >>> import torch
        >>> predicting_mask(torch.tensor([[5, 6, -100]]))  # the first label is never predicted
        tensor([[ True, False, False]])
    """
    supervised = labels[:, 1:] != IGNORE_INDEX
    if real is not None:
        real = real.to(labels.device).bool()
        supervised = supervised & real[:, 1:] & real[:, :-1]
    return torch.cat([supervised, supervised.new_zeros(labels.shape[0], 1)], dim=1)


def supervised_targets(
    labels: Int[Tensor, "batch tokens"], mask: Bool[Tensor, "batch tokens"]
) -> Int[Tensor, " supervised"]:
    """The supervised labels, one per predicting position, in row-major order (as ``logits[mask]``).

    Examples:
        >>> import torch
        >>> labels = torch.tensor([[-100, 4, 5], [-100, -100, 6]])
        >>> supervised_targets(labels, predicting_mask(labels))
        tensor([4, 5, 6])
    """
    return labels[:, 1:][mask[:, :-1]]


def rank_in_example(mask: Bool[Tensor, "batch tokens"]) -> Int[Tensor, " supervised"]:
    """For each predicting position (row-major order): how many predicting positions precede it in its example.

    Examples:
        >>> import torch
        >>> rank_in_example(torch.tensor([[True, False, True], [False, True, False]]))
        tensor([0, 1, 0])
    """
    return (mask.long().cumsum(1) - 1)[mask]


@torch.compiler.disable  # dynamo would trace the probe again, ignoring the cache
@functools.cache
def _slices_by_mask() -> bool:
    """Whether Hugging Face's ``logits_to_keep`` takes a boolean ``(batch, tokens)`` mask."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    try:
        kept = slice_logits_to_keep(torch.zeros(1, 2, 1), torch.tensor([[True, False]]))
    except (RuntimeError, TypeError, IndexError):
        return False
    return tuple(kept.shape) == (1, 1)


def _batch_mask(batch: Batch, what: str) -> Bool[Tensor, "batch tokens"]:
    labels = token_labels(batch)
    if labels is None:
        raise ValueError(
            f"{what} needs causal-LM token labels: a batch mapping with 'labels' of the shape of its "
            "'input_ids' (-100 where no loss is taken)"
        )
    real = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return predicting_mask(labels, real)


def supervised_rows(
    logits: Tensor, mask: Bool[Tensor, "batch tokens"], what: str = "the model function"
) -> Float[Tensor, "supervised vocab"]:
    """The logits of the predicting positions, ``(n_supervised, vocab)``, from whatever the model kept.

    Accepts every position's logits ``(batch, tokens, vocab)`` or the rows of the predicting
    positions already (``(n_supervised, vocab)``, e.g. from ``logits_to_keep``).

    Raises:
        ValueError: any other shape, naming it and the expected ones.

    Examples:
        >>> import torch
        >>> mask = torch.tensor([[True, False, True]])
        >>> supervised_rows(torch.randn(1, 3, 5), mask).shape
        torch.Size([2, 5])
    """
    n = int(mask.sum()) if not torch.compiler.is_compiling() else None
    if logits.ndim == 3 and tuple(logits.shape[:2]) == tuple(mask.shape):
        return logits[mask.to(logits.device)]
    if logits.ndim == 2 and (n is None or logits.shape[0] == n):
        return logits
    raise ValueError(
        f"{what} returned logits of shape {tuple(logits.shape)}, but the batch's token labels need "
        f"every position's logits {(*mask.shape, 'vocab')} or one row per supervised token "
        f"({n}, vocab): use the SupervisedTokenLogits output function"
    )


class SupervisedTokenLogits:
    """Output function: the logits of every position that predicts a supervised token, ``(n_supervised, vocab)``.

    Rows are in row-major order of the batch's predicting positions (`predicting_mask` of its
    ``labels`` and ``attention_mask``), so row ``r`` is scored against
    ``supervised_targets(labels, mask)[r]``. With a [`ModelFunction`][flaplace.params.ModelFunction]
    and a Hugging Face model that takes ``logits_to_keep``, only these positions are projected onto
    the vocabulary; otherwise every position is projected and the rows are taken afterwards.
    The batch must carry its causal-LM ``labels`` (see [`flaplace.tokens`][flaplace.tokens]).

    Examples:
        >>> import torch
        >>> out = torch.randn(1, 4, 10)  # a model's (batch, tokens, vocab) logits
        >>> batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.tensor([[-100, -100, 3, 4]])}
        >>> SupervisedTokenLogits()(out, batch).shape  # positions 1 and 2 predict the labels 3 and 4
        torch.Size([2, 10])
    """

    def __call__(self, output: object, batch: Batch) -> Float[Tensor, "supervised vocab"]:
        logits = logits_of(output)
        mask = _batch_mask(batch, "SupervisedTokenLogits")
        if logits.ndim == 3 and logits.shape[1] != mask.shape[1]:  # integer positions were kept
            positions, kept = _positions(mask)
            if logits.shape[1] == positions.shape[1]:
                return logits[kept.to(logits.device)]
        return supervised_rows(logits, mask, "SupervisedTokenLogits")

    def model_kwargs(self, batch: Batch) -> dict[str, Tensor]:
        """Hugging Face's ``logits_to_keep``: the predicting positions of each example.

        A boolean ``(batch, tokens)`` mask where the model takes one; otherwise integer positions
        ``(batch, k)``, ``k`` the largest count of an example, shorter examples padded with their
        last predicting position (those rows are dropped again by the call).

        Examples:
            >>> import torch
            >>> batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.tensor([[-100, 5, 6]])}
            >>> SupervisedTokenLogits().model_kwargs(batch)["logits_to_keep"].shape
            torch.Size([1, 3])
        """
        mask = _batch_mask(batch, "SupervisedTokenLogits")
        if _slices_by_mask():
            return {"logits_to_keep": mask}
        return {"logits_to_keep": _positions(mask)[0]}


def _positions(mask: Bool[Tensor, "batch tokens"]) -> tuple[Int[Tensor, "batch k"], Bool[Tensor, "batch k"]]:
    """Each example's predicting positions, left-aligned and padded to the longest, and which are real."""
    counts = mask.sum(1)
    k = max(int(counts.max()), 1) if mask.numel() else 1
    order = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    # real positions first, in order: sort by (not predicting, position)
    keys = (~mask).long() * mask.shape[1] + order
    positions = keys.argsort(dim=1)[:, :k]
    kept = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    last = positions.gather(1, (counts - 1).clamp_min(0)[:, None])
    return torch.where(kept, positions, last), kept
