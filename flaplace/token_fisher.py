"""K-FAC's cotangents and log-likelihood for causal-LM token labels (see [`flaplace.tokens`][flaplace.tokens]).

Each supervised token is a categorical observation over the vocabulary; the functions here work
on the logits of the predicting positions, one row per supervised token, and keep their
temporaries to a few rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from flaplace.fisher import fisher_cotangents
from flaplace.tokens import (
    CHUNK_ROWS,
    MAX_EXACT_VOCABULARY,
    predicting_mask,
    rank_in_example,
    supervised_rows,
    supervised_targets,
)


def check_targets(targets: Int[Tensor, " supervised"], vocab: int) -> None:
    """Refuse a supervised label outside the vocabulary ``0..vocab-1`` (checked outside ``torch.compile`` only).

    Raises:
        ValueError: naming the label and the vocabulary size.

    Examples:
        >>> import torch
        >>> check_targets(torch.tensor([0, 3]), 4)  # fine
    """
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"supervised label {bad} is outside the model's vocabulary 0..{vocab - 1}; "
            "mark tokens without a loss with -100"
        )


#: Vocabulary entries per block of the two-level sampler (`_sample_tokens`).
SAMPLING_BLOCK = 256


def _sample_tokens(
    probs: Float[Tensor, "rows vocab"], n_samples: int, generator: torch.Generator | None
) -> Int[Tensor, "rows n_samples"]:
    """``n_samples`` draws per row from ``probs`` by inverting each row's cumulative sum, in two levels.

    One uniform number per draw: over a vocabulary of tens of thousands ``torch.multinomial``
    draws one exponential number per entry, which costs as much as a few layers of the model.
    The inversion first finds the draw's block of `SAMPLING_BLOCK` entries from the blocks'
    cumulative sums, then the entry within that block: a sum over the vocabulary instead of a
    (sequential, several times slower) cumulative sum over it, with the same draws up to rounding.
    """
    rows, vocab = probs.shape
    block = min(SAMPLING_BLOCK, vocab)
    full = vocab // block
    u = torch.rand((rows, n_samples), generator=generator, dtype=probs.dtype, device=probs.device)
    offsets = torch.arange(block, device=probs.device)
    draws = []
    for chunk, uniform in zip(probs.split(CHUNK_ROWS), u.split(CHUNK_ROWS), strict=True):
        sums = chunk.unfold(-1, block, block).sum(-1)  # (rows, full): a view of the chunk, no copy
        if full * block < vocab:  # the shorter last block
            sums = torch.cat([sums, chunk[:, full * block :].sum(-1, keepdim=True)], -1)
        block_cdf = sums.cumsum(-1)
        target = uniform * block_cdf[:, -1:]
        which = torch.searchsorted(block_cdf, target).clamp_(max=block_cdf.shape[-1] - 1)
        before = torch.where(which > 0, block_cdf.gather(1, (which - 1).clamp_(min=0)), 0.0)
        entries = which[..., None] * block + offsets  # (rows, n_samples, block)
        inside = entries < vocab
        values = chunk.gather(1, entries.clamp(max=vocab - 1).flatten(1)).view(entries.shape) * inside
        within = torch.searchsorted(values.cumsum(-1), (target - before)[..., None])[..., 0]
        draws.append(which * block + within.clamp_(max=block - 1))
    return torch.cat(draws).clamp_(max=vocab - 1)


def softmax_in_place(logits: Float[Tensor, "rows vocab"]) -> Float[Tensor, "rows vocab"]:
    """``softmax(logits, -1)`` written over ``logits`` (a few rows at a time), and returned.

    Examples:
        >>> import torch
        >>> softmax_in_place(torch.zeros(1, 4))
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    for chunk in logits.split(CHUNK_ROWS):
        chunk.sub_(torch.logsumexp(chunk, -1, keepdim=True)).exp_()
    return logits


def supervised_log_likelihood(
    rows: Float[Tensor, "supervised vocab"], targets: Int[Tensor, " supervised"], dtype: torch.dtype
) -> Float[Tensor, ""]:
    """``sum_r log softmax(rows[r])[targets[r]]`` in ``dtype``, a few rows at a time (no ``(rows, vocab)`` temporary).

    Examples:
        >>> import torch
        >>> supervised_log_likelihood(torch.zeros(2, 4), torch.tensor([0, 3]), torch.float64)  # 2 log(1/4)
        tensor(-2.7726, dtype=torch.float64)
    """
    total = torch.zeros((), dtype=dtype, device=rows.device)
    for chunk, labels in zip(rows.split(CHUNK_ROWS), targets.split(CHUNK_ROWS), strict=True):
        chunk = chunk.detach().to(dtype)
        total = total + (chunk.gather(1, labels[:, None])[:, 0] - torch.logsumexp(chunk, -1)).sum()
    return total


def log_likelihood_and_softmax_in_place(
    rows: Float[Tensor, "supervised vocab"], targets: Int[Tensor, " supervised"], dtype: torch.dtype
) -> Float[Tensor, ""]:
    """`supervised_log_likelihood` of ``rows``, which are then overwritten by their ``softmax``: one pass over them.

    Each row's maximum, exponentials and sum serve both the log-likelihood and the probabilities,
    a few rows at a time (no ``(rows, vocab)`` temporary).

    Returns:
        ``sum_r log softmax(rows[r])[targets[r]]`` in ``dtype``; ``rows`` holds the probabilities.

    Examples:
        >>> import torch
        >>> rows = torch.zeros(2, 4)
        >>> log_likelihood_and_softmax_in_place(rows, torch.tensor([0, 3]), torch.float64)  # 2 log(1/4)
        tensor(-2.7726, dtype=torch.float64)
        >>> rows
        tensor([[0.2500, 0.2500, 0.2500, 0.2500],
                [0.2500, 0.2500, 0.2500, 0.2500]])
    """
    total = torch.zeros((), dtype=dtype, device=rows.device)
    for chunk, labels in zip(rows.split(CHUNK_ROWS), targets.split(CHUNK_ROWS), strict=True):
        top = chunk.amax(-1, keepdim=True)
        picked = chunk.gather(1, labels[:, None]) - top
        normaliser = chunk.sub_(top).exp_().sum(-1, keepdim=True)
        chunk.div_(normaliser)
        total = total + (picked.to(dtype) - normaliser.to(dtype).log()).sum()
    return total


def token_cotangents(
    rows: Float[Tensor, "supervised vocab"],
    fisher: str,
    *,
    targets: Int[Tensor, " supervised"] | None = None,
    ranks: Int[Tensor, " supervised"] | None = None,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    overwrite: bool = False,
    probabilities: bool = False,
) -> tuple[int, Iterator[Tensor]]:
    """Cotangents of the supervised rows whose pull-backs give each example's Fisher of its summed token loss.

    One cotangent covers all rows at once: the rows of one example are independent tokens of the
    same example, so

    * ``mc``: one token sampled per row from ``softmax`` (``n_samples`` cotangents, each scaled by
      ``1/sqrt(n_samples)``); the cross terms between an example's rows vanish in expectation;
    * ``empirical``: the residual ``onehot(target) - softmax`` of every row (one cotangent: the
      per-example gradient of the summed loss);
    * ``exact``: a square root of each row's ``diag(p) - p p^T`` (``vocab - 1`` columns), one row
      of each example at a time (``ranks`` says which), since deterministic columns of two rows of
      one example would add cross terms: ``max_rank * (vocab - 1)`` cotangents, refused above
      `MAX_EXACT_VOCABULARY`.

    ``overwrite=True`` lets the probabilities (and the last cotangent) take the memory of ``rows``
    when they are float32 or float64: one ``(n_supervised, vocab)`` buffer in all, instead of three.
    ``rows`` is then no longer the logits. ``probabilities=True`` says that ``rows`` hold the
    ``softmax`` already (e.g. from `log_likelihood_and_softmax_in_place`); they are then
    overwritten whatever ``overwrite`` says.

    Returns:
        ``(count, iterator)``: how many cotangents, and the cotangents themselves, made one at a
        time (``(n_supervised, vocab)`` each, in the dtype of ``rows``).

    Raises:
        ValueError: ``exact`` above `MAX_EXACT_VOCABULARY`, or an unknown Fisher type.

    Examples:
        >>> import torch
        >>> count, cotangents = token_cotangents(torch.zeros(3, 4), "mc", n_samples=2)
        >>> count, next(cotangents).shape
        (2, torch.Size([3, 4]))
    """
    rows = rows.detach()
    vocab = rows.shape[-1]
    if fisher not in ("mc", "exact", "empirical"):
        raise ValueError(f"unknown Fisher type {fisher!r}; choose one of ('mc', 'exact', 'empirical')")
    if fisher == "exact" and vocab > MAX_EXACT_VOCABULARY:
        raise ValueError(
            f"fisher='exact' on token labels needs vocab - 1 = {vocab - 1} pull-backs per supervised "
            f"token (vocabulary {vocab} > {MAX_EXACT_VOCABULARY}): use fisher='mc', which samples one token"
        )
    if rows.shape[0] == 0 and not torch.compiler.is_compiling():  # no supervised token in the batch
        return 0, iter(())
    dtype = rows.dtype
    if probabilities:
        probs = rows
    elif overwrite and dtype in (torch.float32, torch.float64):
        probs = softmax_in_place(rows)
    else:
        probs = rows.to(torch.promote_types(dtype, torch.float32)).softmax(-1)
    if fisher == "mc":
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        scale = n_samples**-0.5

        def sampled() -> Iterator[Tensor]:
            draws = _sample_tokens(probs, n_samples, generator)
            index = torch.arange(rows.shape[0], device=rows.device)
            for k in range(n_samples):
                # the last sample reuses the probabilities' memory: one (rows, vocab) buffer in all
                cotangent = probs.mul_(-scale) if k == n_samples - 1 else probs * -scale
                cotangent.index_put_((index, draws[:, k]), cotangent.new_full((), scale), accumulate=True)
                yield cotangent.to(dtype)

        return n_samples, sampled()
    if fisher == "empirical":
        if targets is None:
            raise ValueError("the empirical Fisher needs the supervised token labels")
        residual = probs.neg_()
        residual.index_put_(
            (torch.arange(rows.shape[0], device=rows.device), targets.to(rows.device)),
            residual.new_ones(()),
            accumulate=True,
        )
        return 1, iter([residual.to(dtype)])
    else:  # exact
        slot_of = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device) if ranks is None else ranks
        slots = int(slot_of.max()) + 1 if rows.shape[0] else 0

        def columns() -> Iterator[Tensor]:
            roots = fisher_cotangents(probs.double().log(), "categorical", "exact").to(
                probs.dtype
            )  # (vocab-1, rows, vocab)
            for slot in range(slots):
                keep = (slot_of == slot).to(roots.dtype)[:, None]
                for column in roots:
                    yield (column * keep).to(dtype)

        return slots * (vocab - 1), columns()


def token_kfac_mask(
    labels: Int[Tensor, "batch tokens"], real: Tensor, sharing: str
) -> Bool[Tensor, "batch tokens"]:
    """K-FAC's positions for a batch with token labels: the predicting positions among the real ones.

    Raises:
        ValueError: a mask that is not ``(batch, tokens)``, an all-padding row, or (``reduce``,
            ``last``) an example without a supervised token.

    Examples:
        >>> import torch
        >>> token_kfac_mask(torch.tensor([[-100, 4, 5]]), torch.ones(1, 3), "expand")
        tensor([[ True,  True, False]])
    """
    from flaplace.params import check_rows

    if real.ndim != 2:
        raise ValueError(f"token mask must be (batch, tokens) with token labels, got {tuple(real.shape)}")
    check_rows(real)
    mask = predicting_mask(labels, real)
    if sharing != "expand" and not torch.compiler.is_compiling():
        empty = (~mask.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"example(s) {empty[:5]} have no supervised token (every label -100), which "
                f"sharing={sharing!r} cannot average over: drop them, or use sharing='expand'"
            )
    return mask


@torch.compiler.disable  # eager inside a compiled update: see the docstring
def token_kfac_cotangents(
    logits: Tensor,
    mask: Bool[Tensor, "batch tokens"],
    labels: Int[Tensor, "batch tokens"],
    fisher: str,
    n_samples: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> tuple[int, Iterator[Tensor], Float[Tensor, ""]]:
    """K-FAC's cotangents of the model function's logits, and the batch's summed log-likelihood.

    The logits (every position's, or one row per supervised token) are overwritten: the
    probabilities and the cotangent reuse their memory when they are the supervised rows.
    Inside a ``torch.compile``-d update this function runs eagerly (``torch.compiler.disable``):
    compiled, the in-place steps became copies, three ``(n_supervised, vocab)`` buffers instead
    of one, and the vocabulary-sized work gained no speed.

    Returns:
        ``(count, cotangents, log_likelihood)``; the cotangents have the logits' shape.

    Examples:
        >>> import torch
        >>> labels = torch.tensor([[-100, 1, 2]])
        >>> mask = predicting_mask(labels)
        >>> count, cots, ll = token_kfac_cotangents(
        ...     torch.zeros(2, 3), mask, labels, "mc", n_samples=1, generator=None, dtype=torch.float64
        ... )
        >>> count, round(float(ll), 4)  # 2 log(1/3)
        (1, -2.1972)
    """
    selected = supervised_rows(logits, mask)
    kept_as_is = selected is logits
    rows = selected.detach()
    targets = supervised_targets(labels.to(mask.device), mask).to(rows.device)
    check_targets(targets, rows.shape[-1])
    in_place = rows.dtype in (torch.float32, torch.float64)  # the probabilities take the rows' memory
    if in_place:
        log_likelihood = log_likelihood_and_softmax_in_place(rows, targets, dtype)
    else:
        log_likelihood = supervised_log_likelihood(rows, targets, dtype)
    count, row_cotangents = token_cotangents(
        rows,
        fisher,
        targets=targets,
        ranks=rank_in_example(mask) if fisher == "exact" else None,
        n_samples=n_samples,
        generator=generator,
        overwrite=True,
        probabilities=in_place,
    )
    if kept_as_is:
        return count, row_cotangents, log_likelihood

    def placed() -> Iterator[Tensor]:  # every position's logits: the rows' cotangent at their positions
        for cotangent in row_cotangents:
            full = logits.new_zeros(logits.shape)
            full[mask.to(logits.device)] = cotangent.to(logits.dtype)
            yield full

    return count, placed(), log_likelihood
