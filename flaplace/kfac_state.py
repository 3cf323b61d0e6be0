"""The K-FAC statistics: their state, the factors read from it, and their sum over processes.

[`KFACState`][flaplace.kfac_state.KFACState] holds the running, unnormalised sums that
[`flaplace.kfac`][flaplace.kfac]'s ``update`` adds each batch to;
[`kfac_factors`][flaplace.kfac_state.kfac_factors] normalises them into eigen-form factors, and
[`reduce_across_ranks`][flaplace.kfac_state.reduce_across_ranks] sums them over the processes of
``torch.distributed``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from flaplace.lowrank import dense_eigen, merge_sketches
from flaplace.typing import Eigen, Factors, KronFactor

__all__ = [
    "GROUP_SEPARATOR",
    "KFACState",
    "dense_block",
    "input_factor_keys",
    "kfac_factors",
    "reduce_across_ranks",
]


class KFACState(NamedTuple):
    """Running K-FAC statistics: a pytree of tensors.

    ``S[name]`` and ``A[key]`` are unnormalised sums, either dense ``(d, d)``
    matrices or low-rank sketches ([`Eigen`][flaplace.typing.Eigen] with
    ``m`` columns). Layers fed the same input tensor (q_proj and v_proj of one attention
    block) share one input factor, stored once: the key of a shared ``A`` joins its layers'
    names with ``"|"`` (``"l0.q.weight|l0.v.weight"``); an unshared layer's key is its name.
    [`input_factor_keys`][flaplace.kfac_state.input_factor_keys] maps each layer to its key. The sharing is plain structure (dict
    keys), so ``tree_map``, saving and loading keep it, and ``torch.compile`` guards on it. ``n_examples`` counts examples; ``a_count[name]`` counts the rows
    averaged into ``A`` (real tokens for ``expand``, examples otherwise, and examples
    for a layer that sees one row per example, such as a pooled classifier head).
    ``log_likelihood`` sums the log-likelihood of the targets; it is NaN when a batch
    carried no targets (the training log-likelihood is then unknown, and the evidence refuses it). ``rank[name]`` (per side) is the number of eigenpairs
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


#: Joins the names of the layers that share one input factor into its key in ``KFACState.A``.
#: Torch parameter names are dotted identifiers and never contain it.
GROUP_SEPARATOR = "|"


def input_factor_keys(state: KFACState) -> dict[str, str]:
    """The key in ``state.A`` of each layer's input factor (shared layers have the same key).

    Examples:
        >>> keys = input_factor_keys(state)
        >>> state.A[keys["model.layers.0.self_attn.q_proj.lora_A.default.weight"]]  # doctest: +SKIP
    """
    return {name: key for key in state.A for name in key.split(GROUP_SEPARATOR)}


def kfac_factors(state: KFACState) -> Factors:
    """Normalised factors in eigen form from a K-FAC state.

    ``S`` is kept as summed; ``A`` is divided by the number of real tokens
    (``expand``) or examples (``reduce``, ``last``). Dense factors are
    decomposed exactly; low-rank ones keep their top ``n_kfac`` pairs.

    Examples:
        >>> factors = kfac_factors(state)
        >>> values = factors[name].S.values  # eigenvalues, descending
        >>> bool((values[:-1] >= values[1:]).all())
        True
    """
    if float(state.n_examples) == 0:
        raise ValueError("the K-FAC state has seen no data: call update on at least one batch")
    out: Factors = {}
    keys = input_factor_keys(state)
    inputs: dict[str, Eigen] = {}  # one decomposition per input factor, shared by its layers
    for name in state.S:
        key = keys[name]
        if key not in inputs:
            inputs[key] = _eigen(state.A[key], int(state.rank_A[name]), float(state.a_count[name]), key)
        out[name] = KronFactor(
            S=_eigen(state.S[name], int(state.rank_S[name]), 1.0, name),
            A=inputs[key],
            transposed=state.transposed[name],
        )
    return out


def _eigen(factor: Tensor | Eigen, rank: int, count: float, name: str) -> Eigen:
    if not all(bool(torch.isfinite(t).all()) for t in (factor if isinstance(factor, Eigen) else (factor,))):
        raise FloatingPointError(
            f"non-finite (NaN/inf) K-FAC statistics for {name!r}: the gradients or inputs of a batch "
            "were not finite"
        )
    if isinstance(factor, Eigen):
        return Eigen(factor.vectors[:, :rank], factor.values[:rank] / count)
    return dense_eigen(factor / count)


def reduce_across_ranks(state: KFACState, group: dist.ProcessGroup | None = None) -> KFACState:
    """Sum a K-FAC state over the processes of ``torch.distributed`` (all ranks get the total).

    Dense factors and counts are all-reduced; low-rank sketches are
    all-gathered and merged into the top eigenpairs of their sum.

    Examples:
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

    return state._replace(
        S={n: combined(f) for n, f in state.S.items()},
        A={key: combined(f) for key, f in state.A.items()},  # a shared input factor once
        n_examples=summed(state.n_examples),
        a_count={n: summed(c) for n, c in state.a_count.items()},
        log_likelihood=summed(state.log_likelihood),
    )


def dense_block(factor: KronFactor) -> Float[Tensor, "oi oi"]:
    """``S (x) A`` as a dense matrix (small blocks only: tests and debugging).

    Examples:
        >>> H = dense_block(factors[name])  # (o*i, o*i) in row-major vec(W)
    """

    def full(e: Eigen) -> Tensor:
        return e.dense()

    return torch.kron(full(factor.S), full(factor.A))
