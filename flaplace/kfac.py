"""K-FAC factors of adapter weights as a pure ``(init, update)`` pair.

For each selected weight ``W`` (``o x i``) the block of the Fisher/GGN is
approximated as ``S (x) A`` with the project's normalisation: ``S`` sums over
the data, ``A`` averages, so that ``S (x) A`` approximates the curvature of the
*summed* loss (as laplace-torch and curvlinops do).

| sharing | ``S`` | ``A`` |
|---|---|---|
| expand | ``sum_{n,t} g g^T`` | ``(1/N_tokens) sum_{n,t} a a^T`` |
| reduce | ``sum_n (sum_t g)(sum_t g)^T`` | ``(1/N) sum_n (mean_t a)(mean_t a)^T`` |
| last | ``sum_n g_last g_last^T`` | ``(1/N) sum_n a_last a_last^T`` |

Padded positions (``attention_mask == 0``) are excluded everywhere.

Examples:
    >>> init, update = build(model_fn, fisher="exact", sharing="expand")
    >>> state = init(params)
    >>> for batch in loader:
    ...     state = update(state, params, batch)
    >>> factors = kfac_factors(state)
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Collection, Iterable, Sized
from typing import NamedTuple, get_args

import torch
import torch.distributed as dist
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.capture import capture, output_dim
from flaplace.fisher import FISHER_TYPES, example_cotangents
from flaplace.kfac_state import GROUP_SEPARATOR, KFACState, kfac_factors, reduce_across_ranks
from flaplace.kfac_state import dense_block as dense_block  # re-exported for existing callers
from flaplace.kfac_state import input_factor_keys as input_factor_keys
from flaplace.lowrank import empty_sketch, merge_rows
from flaplace.params import batch_targets, check_rows, token_mask
from flaplace.token_fisher import token_kfac_cotangents, token_kfac_mask
from flaplace.tokens import token_labels
from flaplace.typing import (
    Batch,
    Eigen,
    Factors,
    FisherType,
    Likelihood,
    ModelFn,
    Params,
    Sharing,
)

#: The accepted values of ``sharing`` (from the `Sharing` type).
SHARINGS: tuple[str, ...] = get_args(Sharing)


class KFAC(NamedTuple):
    """The pure pair returned by `build`."""

    init: Callable[..., KFACState]  # (params, batch=None) -> state
    update: Callable[..., KFACState]


def build(
    model_fn: ModelFn,
    *,
    likelihood: Likelihood = "categorical",
    fisher: FisherType = "mc",
    sharing: Sharing = "expand",
    n_samples: int = 1,
    sigma: float = 1.0,
    n_kfac: int = 10,
    lr_threshold: int | None = 100,
    oversample: int | None = None,
    targets: Collection[str] | None = None,
    transposed: Collection[str] | None = None,
    token_mask_fn: Callable[[Batch], Tensor] = token_mask,
    targets_fn: Callable[[Batch], Tensor] = batch_targets,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> KFAC:
    """Build the pure K-FAC pair ``(init, update)`` for ``model_fn``.

    Args:
        model_fn: ``f(params, batch) -> logits (batch, C)``, e.g. a
            [`ModelFunction`][flaplace.params.ModelFunction]; causal-LM token labels: `flaplace.tokens`.
        likelihood: ``categorical``, ``bernoulli`` (one logit) or ``gaussian``.
        fisher: ``mc`` (``n_samples`` draws), ``exact`` (GGN) or ``empirical``.
        sharing: ``expand``, ``reduce`` or ``last`` (how positions are combined).
        n_samples: Monte Carlo samples per example for ``fisher="mc"``.
        sigma: Gaussian noise standard deviation.
        n_kfac: eigenpairs kept by a low-rank factor.
        lr_threshold: a factor whose side is at least this is low rank; ``None``
            keeps every factor dense.
        oversample: extra eigenpairs the stream keeps for accuracy (default
            ``n_kfac``); only the top ``n_kfac`` are returned.
        targets: which parameters get factors (default: all of ``params``).
        transposed: weights stored ``(in, out)``; default ``model_fn.transposed`` if it has one.
        token_mask_fn: ``batch -> (batch, tokens)`` bool mask of real positions.
        targets_fn: ``batch -> targets`` (for the empirical Fisher and the log-likelihood).
        dtype: accumulation dtype (default: the parameters' dtype, float32 for half precision).
        generator: random generator for ``mc`` (reproducible factors).

    Returns:
        ``KFAC(init, update)``: ``init(params, batch=None) -> state`` and
        ``update(state, params, batch) -> state``, both pure. Given an example ``batch``,
        ``init`` runs one forward pass to find the layers fed the same input tensor, which then
        share one input factor (one product and one decomposition per group); without it every
        layer has its own. The state's structure never changes in ``update``, so a compiled
        ``update`` compiles once.

    The compiled ``update`` is traced without graph breaks when called without a ``generator`` (for
    ``fisher="mc"`` seed the global RNG with ``torch.manual_seed``: dynamo cannot trace ``torch.Generator``
    objects) and without token labels (these need ``compile_update(update, fullgraph=False)``).

    Examples:
        >>> init, update = build(model_fn, fisher="exact", sharing="last", lr_threshold=None)
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown Fisher type {fisher!r}; choose one of {FISHER_TYPES}")
    if sharing not in SHARINGS:
        raise ValueError(f"unknown sharing {sharing!r}; choose one of {SHARINGS}")
    if n_kfac < 1:
        raise ValueError(f"n_kfac must be at least 1, got {n_kfac}")
    layout = frozenset(getattr(model_fn, "transposed", frozenset()) if transposed is None else transposed)
    extra = n_kfac if oversample is None else oversample

    def names_of(params: Params) -> list[str]:
        names = list(params) if targets is None else list(targets)
        if not names:
            raise ValueError("no parameters to build K-FAC factors for")
        return names

    def sides(params: Params, name: str) -> tuple[int, int]:
        o = output_dim(params[name], name in layout)
        return o, params[name].numel() // o

    def init(params: Params, batch: Batch | None = None) -> KFACState:
        names = names_of(params)
        for name in names:
            if name not in params:
                raise KeyError(f"target {name!r} is not in params")
        first = params[names[0]]
        acc = dtype or (torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype)

        def empty(dim: int) -> tuple[Tensor | Eigen, Tensor]:  # a fresh object for every entry
            if lr_threshold is not None and dim >= lr_threshold:
                return empty_sketch(dim, n_kfac + extra, dtype=acc, device=first.device), torch.tensor(
                    min(n_kfac, dim)
                )
            return torch.zeros((dim, dim), dtype=acc, device=first.device), torch.tensor(0)

        S, A, rank_S, rank_A = {}, {}, {}, {}
        for name in names:
            o, _ = sides(params, name)
            S[name], rank_S[name] = empty(o)
        for group in _input_groups(params, names, batch):
            _, i = sides(params, group[0])
            key = GROUP_SEPARATOR.join(group)
            A[key], rank = empty(i)
            for name in group:
                rank_A[name] = rank.clone()
        zero = torch.zeros((), dtype=acc, device=first.device)
        return KFACState(
            S=S,
            A=A,
            n_examples=zero.clone(),
            a_count={n: zero.clone() for n in names},
            log_likelihood=zero.clone(),
            rank_S=rank_S,
            rank_A=rank_A,
            transposed={n: torch.tensor(n in layout) for n in names},
        )

    def _input_groups(params: Params, names: list[str], batch: Batch | None) -> list[list[str]]:
        """Targets in groups fed the same input tensor (one forward of ``batch``); singletons without one."""
        for name in names:
            if GROUP_SEPARATOR in name:
                raise ValueError(f"parameter name {name!r} contains {GROUP_SEPARATOR!r}")
        if batch is None:
            return [[n] for n in names]
        mask = token_mask_fn(batch)
        if mask.ndim == 3:  # (batch, rows, tokens): several sequences per example
            mask = mask.flatten(0, 1)
        check_rows(mask)
        _, _, inputs = capture(
            model_fn, params, batch, (mask.shape[0], mask.shape[1]), targets=names, transposed=layout
        )
        groups: list[list[str]] = []
        for name in names:
            for group in groups:
                if inputs[group[0]] is inputs[name]:
                    group.append(name)
                    break
            else:
                groups.append([name])
        return groups

    def update(
        state: KFACState, params: Params, batch: Batch, generator: torch.Generator | None = generator
    ) -> KFACState:
        names = list(state.S)
        mask = token_mask_fn(batch)
        by_token_labels = token_labels(batch) if likelihood == "categorical" else None
        if by_token_labels is not None:  # only the positions that predict a supervised token count
            mask = token_kfac_mask(by_token_labels, mask, sharing)
        # A 3-D mask (batch, rows, tokens): each example is `rows` sequences (e.g. one per answer
        # choice), all of whose positions are that example's positions.
        n_batch, per_example = mask.shape[0], (mask.shape[1] if mask.ndim == 3 else 1)
        if mask.ndim == 3:
            mask = mask.flatten(0, 1)
        if mask.ndim != 2:
            raise ValueError(
                f"token mask must be (batch, tokens) or (batch, rows, tokens), got {tuple(mask.shape)}"
            )
        if by_token_labels is None:
            check_rows(mask)
        # sharing "last" reads one position per row: the capture pulls back to those positions only
        token_last = _last_index(mask.to(state.n_examples.dtype)) if sharing == "last" else None
        shape = (mask.shape[0], mask.shape[1])
        logits, output_grads, inputs = capture(
            model_fn, params, batch, shape, targets=names, transposed=layout, positions=token_last
        )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(logits.sum(dtype=torch.float32))):
            raise FloatingPointError(
                "non-finite (NaN/inf) logits in this batch: check the model's weights and inputs "
                "(e.g. a diverged fine-tune, or half precision overflowing)"
            )
        acc = state.n_examples.dtype
        if by_token_labels is not None:
            count_of, cotangents, ll_term = token_kfac_cotangents(
                logits, mask, by_token_labels, fisher, n_samples, generator, acc
            )
        else:
            targets = targets_fn(batch) if _has_targets(batch, targets_fn) else None
            count_of, cotangents, ll_term = example_cotangents(
                logits, likelihood, fisher, targets, n_samples, sigma, generator, acc
            )
        token_weights = mask.to(acc)
        example_weights = token_weights.new_ones(mask.shape[0], 1)

        # (weights of the positions, index of each example's last real one), computed once;
        # the index only for sharing "last", the one rule that reads it
        by_token = (token_weights, token_last)
        by_example = (example_weights, None if token_last is None else torch.zeros_like(token_last))

        def weights_of(
            name: str,
        ) -> tuple[Tensor, Tensor | None]:  # a pooled classifier head: one row per example
            return by_example if inputs[name].shape[1] == 1 < mask.shape[1] else by_token

        # One pull-back per cotangent in a loop (unlike vmap: one backward's intermediates at a time, no
        # batching rules). Dense S takes each cotangent's rows; a low-rank sketch merges all at once.
        S, A, count = dict(state.S), dict(state.A), dict(state.a_count)
        sketch_rows: dict[str, list[Tensor]] = {n: [] for n in names if isinstance(S[n], Eigen)}
        for k, cotangent in enumerate(cotangents):
            final = k == count_of - 1
            # The last pull-back frees the forward's saved activations as its backward goes.
            grads = output_grads(cotangent, last=final)
            if final:
                del output_grads
            for name in names:
                g = grads[name][:, : inputs[name].shape[1]].to(acc)
                # sharing "last": the captured gradients are already at the last positions (index 0)
                rows = _gradient_rows(
                    g, *(by_example if sharing == "last" else weights_of(name)), sharing, per_example
                )
                if name in sketch_rows:
                    sketch_rows[name].append(rows)
                else:
                    S[name] = _accumulate(S[name], rows)
            del grads
        for name, rows_list in sketch_rows.items():
            S[name] = _accumulate(S[name], rows_list[0] if len(rows_list) == 1 else torch.cat(rows_list))
        for key in state.A:
            group = key.split(GROUP_SEPARATOR)
            x = inputs[group[0]]
            others = [n for n in group[1:] if inputs[n] is not x]
            if others:
                raise ValueError(
                    f"layers {group[0]!r} and {others[0]!r} share one input factor in the state but "
                    "were fed different inputs in this batch; build the state with init(params, batch) "
                    "on a batch of this model, or init(params) for no sharing"
                )
            weights, last = weights_of(group[0])
            A[key] = _accumulate(state.A[key], _input_rows(x.to(acc), weights, last, sharing, per_example))
            for name in group:
                count[name] = count[name] + (weights.sum() if sharing == "expand" else n_batch)
        return state._replace(
            S=S,
            A=A,
            n_examples=state.n_examples + n_batch,
            a_count=count,
            log_likelihood=state.log_likelihood + ll_term,
        )

    return KFAC(init, update)


def _has_targets(batch: Batch, targets_fn: Callable[[Batch], Tensor]) -> bool:
    try:
        targets_fn(batch)
    except (KeyError, IndexError, TypeError):
        return False
    return True


def _gradient_rows(
    grads: Float[Tensor, "batch tokens o"],
    mask: Float[Tensor, "batch tokens"],
    last: Int[Tensor, " batch"] | None,
    sharing: str,
    per_example: int = 1,
) -> Float[Tensor, "rows o"]:
    """Rows whose outer products sum to one cotangent's (unnormalised) contribution to ``S``.

    ``per_example`` consecutive sequences form one example: ``reduce`` and ``last`` sum over them.
    """
    if sharing == "expand":
        return rearrange(grads * mask[:, :, None], "b t o -> (b t) o")
    if sharing == "reduce":
        rows = (grads * mask[:, :, None]).sum(1)
    else:
        assert last is not None, "sharing 'last' needs the last positions"
        rows = _at_positions(grads, last)
    return rows if per_example == 1 else rows.unflatten(0, (-1, per_example)).sum(1)


def _input_rows(
    inputs: Float[Tensor, "batch tokens i"],
    mask: Float[Tensor, "batch tokens"],
    last: Int[Tensor, " batch"] | None,
    sharing: str,
    per_example: int = 1,
) -> Float[Tensor, "rows i"]:
    """Rows whose outer products sum to the batch's (unnormalised) ``A``.

    ``per_example`` consecutive sequences form one example: ``reduce`` and ``last`` average over
    all of their (real, respectively last) positions.
    """
    if sharing == "expand":
        return rearrange(inputs * mask[:, :, None], "b t i -> (b t) i")
    if sharing == "reduce":
        summed = (inputs * mask[:, :, None]).sum(1).unflatten(0, (-1, per_example)).sum(1)
        return summed / mask.sum(1).unflatten(0, (-1, per_example)).sum(1, keepdim=True).clamp_min(1)
    assert last is not None, "sharing 'last' needs the last positions"
    rows = _at_positions(inputs, last)
    return rows if per_example == 1 else rows.unflatten(0, (-1, per_example)).mean(1)


def _at_positions(
    x: Float[Tensor, "batch tokens d"], index: Int[Tensor, " batch"]
) -> Float[Tensor, "batch d"]:
    """``x[b, index[b]]`` for every example ``b``."""
    return x.gather(1, index[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]


def _last_index(mask: Float[Tensor, "batch tokens"]) -> Int[Tensor, " batch"]:
    positions = torch.arange(mask.shape[1], device=mask.device)
    return ((mask > 0) * positions).amax(dim=1)


def _accumulate(factor: Tensor | Eigen, rows: Tensor) -> Tensor | Eigen:
    if isinstance(factor, Eigen):
        return merge_rows(factor, rows)
    return torch.addmm(factor, rows.T, rows)


class KFACFit(NamedTuple):
    """What [`fit`][flaplace.kfac.fit] returns: the factors and the final statistics.

    Unpacks as ``factors, state = fit(...)``.
    """

    factors: Factors
    state: KFACState


def fit(
    model_fn: ModelFn,
    params: Params,
    batches: Iterable[Batch],
    *,
    distributed: bool = False,
    progress: bool = True,
    **options,
) -> KFACFit:
    """K-FAC factors over every batch of ``batches`` (any iterable, e.g. a DataLoader).

    Args:
        model_fn: ``f(params, batch) -> logits``.
        params: the adapted weights (at the MAP).
        batches: the training data; a partial last batch is fine.
        distributed: sum the statistics over ``torch.distributed`` ranks, each
            of which passes its own shard of the data.
        progress: show a tqdm progress bar.
        **options: forwarded to [`build`][flaplace.kfac.build] (``fisher``, ``sharing``, ``n_kfac``, ...).

    The first batch also goes to ``init`` (to find the layers that share an input factor).

    Returns:
        A [`KFACFit`][flaplace.kfac.KFACFit] ``(factors, state)``; the state's
        ``log_likelihood`` is the training log-likelihood the evidence needs.

    Raises:
        RuntimeError: ``distributed=True`` without an initialised process group.
        ValueError, FloatingPointError: a bad batch (no rows, an all-padding row, non-finite
            logits), with its index: ``"K-FAC batch k: ..."``.

    Examples:
        >>> factors, state = fit(model_fn, params, loader, fisher="exact")
    """
    if options.pop("return_state", None) is not None:
        warnings.warn(
            "fit(return_state=...) is no longer needed: fit always returns (factors, state)",
            DeprecationWarning,
            stacklevel=2,
        )
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "fit_kfac(distributed=True) needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group first, or pass distributed=False"
        )
    init, update = build(model_fn, **options)
    total = len(batches) if isinstance(batches, Sized) else None
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("the batches are empty: K-FAC needs at least one batch")
    try:
        state = init(params, first)  # finds the layers that share an input factor
    except (ValueError, FloatingPointError) as error:
        raise type(error)(f"K-FAC batch 0: {error}") from error
    bar = tqdm(
        itertools.chain([first], iterator), desc="K-FAC", disable=not progress, unit="batch", total=total
    )
    for k, batch in enumerate(bar):
        try:
            state = update(state, params, batch)
        except (ValueError, FloatingPointError) as error:
            raise type(error)(f"K-FAC batch {k}: {error}") from error
    if distributed:
        state = reduce_across_ranks(state)
    factors = kfac_factors(state)
    return KFACFit(factors, state)
