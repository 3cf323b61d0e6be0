"""K-FAC factors of adapter weights as a pure ``(init, update)`` pair.

For each selected weight ``W`` (``o x i``) the block of the Fisher/GGN is
approximated as ``S (x) A`` with DESIGN.md's normalisation: ``S`` sums over
the data, ``A`` averages, so that ``S (x) A`` approximates the curvature of the
*summed* loss (as laplace-torch and curvlinops do).

=========  ==================================  ==========================================
sharing    ``S``                               ``A``
=========  ==================================  ==========================================
expand     ``sum_{n,t} g g^T``                 ``(1/N_tokens) sum_{n,t} a a^T``
reduce     ``sum_n (sum_t g)(sum_t g)^T``      ``(1/N) sum_n (mean_t a)(mean_t a)^T``
last       ``sum_n g_last g_last^T``           ``(1/N) sum_n a_last a_last^T``
=========  ==================================  ==========================================

Padded positions (``attention_mask == 0``) are excluded everywhere.

Example:
    >>> init, update = build(model_fn, fisher="exact", sharing="expand")
    >>> state = init(params)
    >>> for batch in loader:
    ...     state = update(state, params, batch)
    >>> factors = kfac_factors(state)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from flaplace.capture import capture, output_dim
from flaplace.fisher import FISHER_TYPES, fisher_cotangents, log_likelihood
from flaplace.lowrank import dense_eigen, empty_sketch, merge_rows, merge_sketches
from flaplace.params import batch_targets, token_mask
from flaplace.typing import (
    Batch,
    Eigen,
    Factors,
    FisherType,
    KronFactor,
    Likelihood,
    ModelFn,
    Params,
    Sharing,
)

SHARINGS = ("expand", "reduce", "last")


class KFACState(NamedTuple):
    """Running K-FAC statistics: a pytree of tensors.

    ``S[name]`` and ``A[name]`` are unnormalised sums, either dense ``(d, d)``
    matrices or low-rank sketches (:class:`~flaplace.typing.Eigen` with
    ``m`` columns). ``n_examples`` counts examples; ``a_count[name]`` counts the rows
    averaged into ``A`` (real tokens for ``expand``, examples otherwise, and examples
    for a layer that sees one row per example, such as a pooled classifier head).
    ``log_likelihood`` sums the log-likelihood of the targets when the
    batches carry them. ``rank[name]`` (per side) is the number of eigenpairs
    a low-rank factor keeps (0 for a dense factor); ``transposed[name]`` marks
    weights stored ``(in, out)``.
    """

    S: dict[str, Tensor | Eigen]
    A: dict[str, Tensor | Eigen]
    n_examples: Tensor
    a_count: dict[str, Tensor]
    log_likelihood: Tensor
    rank_S: dict[str, Tensor]
    rank_A: dict[str, Tensor]
    transposed: dict[str, Tensor]


class KFAC(NamedTuple):
    """The pure pair returned by :func:`build`."""

    init: Callable[[Params], KFACState]
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
            :class:`~flaplace.params.ModelFunction`.
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
        ``KFAC(init, update)``: ``init(params) -> state`` and
        ``update(state, params, batch) -> state``, both pure.

    Example:
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

    def init(params: Params) -> KFACState:
        names = names_of(params)
        first = params[names[0]]
        acc = dtype or (torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype)

        # One empty factor object per side length: factors start shared, and `update` keeps two
        # A factors shared (one product, one decomposition) while their layers see the same input.
        empties: dict[int, Tensor | Eigen] = {}

        def empty(dim: int) -> tuple[Tensor | Eigen, Tensor]:
            if lr_threshold is not None and dim >= lr_threshold:
                if dim not in empties:
                    empties[dim] = empty_sketch(dim, n_kfac + extra, dtype=acc, device=first.device)
                return empties[dim], torch.tensor(min(n_kfac, dim))
            if dim not in empties:
                empties[dim] = torch.zeros((dim, dim), dtype=acc, device=first.device)
            return empties[dim], torch.tensor(0)

        S, A, rank_S, rank_A = {}, {}, {}, {}
        for name in names:
            if name not in params:
                raise KeyError(f"target {name!r} is not in params")
            o, i = sides(params, name)
            S[name], rank_S[name] = empty(o)
            A[name], rank_A[name] = empty(i)
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

    def update(
        state: KFACState, params: Params, batch: Batch, generator: torch.Generator | None = generator
    ) -> KFACState:
        names = list(state.S)
        mask = token_mask_fn(batch)
        # A 3-D mask (batch, rows, tokens): each example is `rows` sequences (e.g. one per answer
        # choice), all of whose positions are that example's positions.
        n_batch, per_example = mask.shape[0], (mask.shape[1] if mask.ndim == 3 else 1)
        if mask.ndim == 3:
            mask = mask.flatten(0, 1)
        if mask.ndim != 2:
            raise ValueError(
                f"token mask must be (batch, tokens) or (batch, rows, tokens), got {tuple(mask.shape)}"
            )
        logits, output_grads, inputs = capture(
            model_fn, params, batch, (mask.shape[0], mask.shape[1]), targets=names, transposed=layout
        )
        has_targets = _has_targets(batch, targets_fn)
        labels = targets_fn(batch) if has_targets else None
        cotangents = fisher_cotangents(
            logits, likelihood, fisher, targets=labels, n_samples=n_samples, sigma=sigma, generator=generator
        )
        acc = state.n_examples.dtype
        token_weights = mask.to(acc)
        example_weights = token_weights.new_ones(mask.shape[0], 1)

        # (weights of the positions, index of each example's last real one), computed once;
        # the index only for sharing "last", the one rule that reads it
        token_last = _last_index(token_weights) if sharing == "last" else None
        by_token = (token_weights, token_last)
        by_example = (example_weights, None if token_last is None else torch.zeros_like(token_last))

        def weights_of(
            name: str,
        ) -> tuple[Tensor, Tensor | None]:  # a pooled classifier head: one row per example
            return by_example if inputs[name].shape[1] == 1 < mask.shape[1] else by_token

        # One pull-back per cotangent, in a loop: unlike vmap, it keeps one backward's
        # intermediates alive at a time and needs no batching rule for every op on the path.
        # Dense S factors take each cotangent's rows at once; a low-rank sketch merges them all
        # in one step (one range finder and one small eigendecomposition per batch).
        S, A, count = dict(state.S), dict(state.A), dict(state.a_count)
        sketch_rows: dict[str, list[Tensor]] = {n: [] for n in names if isinstance(S[n], Eigen)}
        for k, cotangent in enumerate(cotangents):
            grads = output_grads(cotangent)
            if k == len(cotangents) - 1:
                del output_grads  # the last pull-back: free the forward's saved activations now
            for name in names:
                g = grads[name][:, : inputs[name].shape[1]].to(acc)
                rows = _gradient_rows(g, *weights_of(name), sharing, per_example)
                if name in sketch_rows:
                    sketch_rows[name].append(rows)
                else:
                    S[name] = _accumulate(S[name], rows)
            del grads
        for name, rows_list in sketch_rows.items():
            S[name] = _accumulate(S[name], rows_list[0] if len(rows_list) == 1 else torch.cat(rows_list))
        done: list[tuple[Tensor, Tensor | Eigen, Tensor | Eigen]] = []  # (input, old A, new A)
        for name in names:
            weights, last = weights_of(name)
            # Same input object and same running A (e.g. q_proj and v_proj): same new A, computed once.
            shared = [new for x, old, new in done if x is inputs[name] and old is state.A[name]]
            if shared:
                A[name] = shared[0]
            else:
                A[name] = _accumulate(
                    state.A[name], _input_rows(inputs[name].to(acc), weights, last, sharing, per_example)
                )
                done.append((inputs[name], state.A[name], A[name]))
            count[name] = count[name] + (weights.sum() if sharing == "expand" else n_batch)
        ll = state.log_likelihood
        if labels is not None:
            ll = ll + log_likelihood(logits.detach().to(acc), labels, likelihood, sigma)
        return state._replace(
            S=S,
            A=A,
            n_examples=state.n_examples + n_batch,
            a_count=count,
            log_likelihood=ll,
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
        return (grads * mask[:, :, None]).reshape(-1, grads.shape[-1])
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
        return (inputs * mask[:, :, None]).reshape(-1, inputs.shape[-1])
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


def kfac_factors(state: KFACState) -> Factors:
    """Normalised factors in eigen form from a K-FAC state.

    ``S`` is kept as summed; ``A`` is divided by the number of real tokens
    (``expand``) or examples (``reduce``, ``last``). Dense factors are
    decomposed exactly; low-rank ones keep their top ``n_kfac`` pairs.

    Example:
        >>> factors = kfac_factors(state)
        >>> factors[name].S.values  # eigenvalues, descending
    """
    if float(state.n_examples) == 0:
        raise ValueError("the K-FAC state has seen no data: call update on at least one batch")
    out: Factors = {}
    decomposed: list[tuple[Tensor | Eigen, int, float, Eigen]] = []  # factors shared by several names

    def eigen(factor: Tensor | Eigen, rank: int, count: float) -> Eigen:
        for seen, r, c, result in decomposed:
            if seen is factor and r == rank and c == count:
                return result
        result = _eigen(factor, rank, count)
        decomposed.append((factor, rank, count, result))
        return result

    for name in state.S:
        out[name] = KronFactor(
            S=eigen(state.S[name], int(state.rank_S[name]), 1.0),
            A=eigen(state.A[name], int(state.rank_A[name]), float(state.a_count[name])),
            transposed=state.transposed[name],
        )
    return out


def _eigen(factor: Tensor | Eigen, rank: int, count: float) -> Eigen:
    if isinstance(factor, Eigen):
        return Eigen(factor.vectors[:, :rank], factor.values[:rank] / count)
    return dense_eigen(factor / count)


def reduce_across_ranks(state: KFACState, group: dist.ProcessGroup | None = None) -> KFACState:
    """Sum a K-FAC state over the processes of ``torch.distributed`` (all ranks get the total).

    Dense factors and counts are all-reduced; low-rank sketches are
    all-gathered and merged into the top eigenpairs of their sum.

    Example:
        >>> state = reduce_across_ranks(state)  # after each rank saw its shard of the data
    """
    if not (dist.is_available() and dist.is_initialized()):
        return state

    def summed(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def combined(factor: Tensor | Eigen) -> Tensor | Eigen:
        if not isinstance(factor, Eigen):
            return summed(factor)
        world = dist.get_world_size(group)
        vectors = [torch.empty_like(factor.vectors) for _ in range(world)]
        values = [torch.empty_like(factor.values) for _ in range(world)]
        dist.all_gather(vectors, factor.vectors.contiguous(), group=group)
        dist.all_gather(values, factor.values.contiguous(), group=group)
        return merge_sketches(
            [Eigen(v, w) for v, w in zip(vectors, values, strict=True)], factor.values.shape[0]
        )

    reduced: dict[int, tuple[Tensor | Eigen, Tensor | Eigen]] = {}  # by id: shared factors stay shared

    def once(factor: Tensor | Eigen) -> Tensor | Eigen:
        if id(factor) not in reduced:
            reduced[id(factor)] = (factor, combined(factor))
        return reduced[id(factor)][1]

    return state._replace(
        S={n: once(f) for n, f in state.S.items()},
        A={n: once(f) for n, f in state.A.items()},
        n_examples=summed(state.n_examples),
        a_count={n: summed(c) for n, c in state.a_count.items()},
        log_likelihood=summed(state.log_likelihood),
    )


def fit(
    model_fn: ModelFn,
    params: Params,
    batches: Iterable[Batch],
    *,
    distributed: bool = False,
    progress: bool = True,
    return_state: bool = False,
    **options,
) -> Factors | tuple[Factors, KFACState]:
    """K-FAC factors over every batch of ``batches`` (any iterable, e.g. a DataLoader).

    Args:
        model_fn: ``f(params, batch) -> logits``.
        params: the adapted weights (at the MAP).
        batches: the training data; a partial last batch is fine.
        distributed: sum the statistics over ``torch.distributed`` ranks, each
            of which passes its own shard of the data.
        progress: show a tqdm progress bar.
        return_state: also return the final :class:`KFACState` (its
            ``log_likelihood`` is the training log-likelihood the evidence needs).
        **options: forwarded to :func:`build` (``fisher``, ``sharing``, ``n_kfac``, ...).

    Example:
        >>> factors, state = fit(model_fn, params, loader, fisher="exact", return_state=True)
    """
    init, update = build(model_fn, **options)
    state = init(params)
    seen = 0
    for batch in tqdm(batches, desc="K-FAC", disable=not progress, unit="batch"):
        state = update(state, params, batch)
        seen += 1
    if seen == 0:
        raise ValueError("the batches are empty: K-FAC needs at least one batch")
    if distributed:
        state = reduce_across_ranks(state)
    factors = kfac_factors(state)
    return (factors, state) if return_state else factors


def dense_block(factor: KronFactor) -> Float[Tensor, "oi oi"]:
    """``S (x) A`` as a dense matrix (small blocks only: tests and debugging).

    Example:
        >>> H = dense_block(factors[name])  # (o*i, o*i) in row-major vec(W)
    """

    def full(e: Eigen) -> Tensor:
        return (e.vectors * e.values) @ e.vectors.T

    return torch.kron(full(factor.S), full(factor.A))
