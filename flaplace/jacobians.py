"""Per-example Jacobians of the logits with respect to the parameters.

For a model function ``f(params, batch) -> logits (B, C)``, `per_example_jacobians` returns
each example's ``J[b, c] = d f[b, c] / d theta`` for every parameter, without differentiating the
batched function as a whole. Four methods compute the same Jacobians: ``"capture"`` (one captured
forward pass of the whole batch and ``C`` pull-backs, through [`flaplace.capture`][flaplace.capture]),
``"vmap"`` (``jacrev`` of one example, vectorised over the batch), ``"loop"`` (one example after
another) and ``"auto"``, which takes the first of these that runs. The linearised predictive
([`flaplace.predictive`][flaplace.predictive]) and the Jacobian cache
([`flaplace.jacobian_cache`][flaplace.jacobian_cache]) build on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, TypeAlias, get_args

import optree
import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import jacrev, vmap

from flaplace.capture import CaptureError, capture
from flaplace.params import token_mask
from flaplace.typing import Batch, ModelFn, Params

JacobianMethod: TypeAlias = Literal["auto", "vmap", "loop", "capture"]
#: The accepted values of ``method`` (from the `JacobianMethod` type).
JACOBIAN_METHODS: tuple[str, ...] = get_args(JacobianMethod)

__all__ = ["JACOBIAN_METHODS", "JacobianMethod", "jacobians_and_logits", "per_example_jacobians"]


def per_example_jacobians(
    model_fn: ModelFn,
    params: Params,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    method: JacobianMethod = "auto",
) -> dict[str, Tensor]:
    """Jacobians of each example's ``C`` logits with respect to every parameter.

    Each example is differentiated on its own (``jacrev`` of the single-example function,
    ``vmap``-ed over the examples), so the cost grows linearly with the batch size; the batched
    function is never differentiated as a whole.

    Every tensor of ``batch`` with at least one dimension is split along its first dimension
    (they must all have the batch size there); other leaves (0-d tensors, numbers, strings) are
    shared by all examples. The model function sees each example as a batch of one.

    Args:
        model_fn: ``f(params, batch) -> logits (B, C)``, e.g. a
            [`flaplace.params.ModelFunction`][flaplace.params.ModelFunction].
        params: the point to differentiate at (a dict of tensors).
        batch: a mapping of tensors or a tuple ``(inputs, targets)``.
        chunk_size: examples per vectorised chunk (``vmap``'s ``chunk_size``); ``None`` does the
            whole batch at once. Smaller chunks bound the memory of the Jacobian computation.
        method: ``"auto"`` (default) takes ``"capture"`` and falls back to ``"vmap"``, then
            ``"loop"``, where the one before cannot run (parameters that are not weight matrices
            used once by a linear layer; a model ``vmap`` cannot trace); under ``torch.compile``
            it is ``"vmap"``. ``"vmap"`` vectorises over the examples; ``"loop"`` differentiates one
            example after another. Use ``"loop"`` for models whose forward pass branches on
            tensor values, which ``vmap`` cannot trace (e.g. Hugging Face encoders such as BERT
            given a 2-D ``attention_mask``; see docs/predictive.md). ``"capture"`` uses the
            K-FAC capture mechanism ([`flaplace.capture.capture`][flaplace.capture.capture]): one forward pass of the
            whole batch and ``C`` pull-backs give every example's ``G_c = sum_t g_t a_t^T``;
            no ``vmap`` over the model, so any attention implementation works. It needs every
            parameter to be a weight matrix used through ``F.linear``/``addmm``, and examples
            that do not interact in the forward pass (true of transformers).

    Returns:
        ``{name: J}`` with ``J`` of shape ``(B, C, *params[name].shape)`` in the parameter's dtype.

    Raises:
        ValueError: empty ``params``, a batch without tensors or with tensors of different
            leading sizes, an unknown ``method``, a bad ``chunk_size``, or a model function that
            does not return ``(1, C)`` logits for one example.
        RuntimeError: ``vmap`` could not trace the model (the message suggests fixes).

    Examples:
        >>> f = ModelFunction(model, select_params(model, "lora"), LastTokenLogits([id_a, id_b]))  # doctest: +SKIP
        >>> jac = per_example_jacobians(f, params, {"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
        >>> jac["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape  # doctest: +SKIP
        torch.Size([8, 2, 2, 32])
    """
    jacobians, _ = _jacobians_and_logits(model_fn, params, batch, chunk_size=chunk_size, method=method)
    return jacobians


def jacobians_and_logits(
    model_fn: ModelFn,
    params: Params,
    batch: Batch,
    *,
    method: JacobianMethod = "auto",
    chunk_size: int | None = None,
) -> tuple[dict[str, Tensor], Float[Tensor, "batch classes"]]:
    """Per-example Jacobians (as [`per_example_jacobians`][flaplace.jacobians.per_example_jacobians])
    and the logits ``f_mu`` at ``params``, which every method computes on the way.

    Examples:
        >>> import torch
        >>> W = torch.randn(3, 4)
        >>> jac, f_mu = jacobians_and_logits(lambda p, b: b[0] @ p["W"].T, {"W": W}, (torch.randn(2, 4),))
        >>> jac["W"].shape, f_mu.shape
        (torch.Size([2, 3, 3, 4]), torch.Size([2, 3]))
    """
    return _jacobians_and_logits(model_fn, params, batch, chunk_size=chunk_size, method=method)


class _SplitBatch(NamedTuple):
    """A batch flattened into leaves: the per-example tensors and how to rebuild one example."""

    leaves: list[Any]
    spec: optree.PyTreeSpec
    batched: list[int]  # positions of the leaves that are split along dim 0
    size: int


def _split_batch(batch: Batch) -> _SplitBatch:
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)  # e.g. a tokenizer's BatchEncoding
    leaves: list[Any]
    leaves, spec = optree.tree_flatten(batch, none_is_leaf=True)  # type: ignore[arg-type]
    batched = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.ndim > 0]
    if not batched:
        raise ValueError("the batch holds no tensor with a batch dimension")
    sizes = {leaves[i].shape[0] for i in batched}
    if len(sizes) != 1:
        raise ValueError(f"every batch tensor needs the same leading (batch) size, got sizes {sorted(sizes)}")
    size = sizes.pop()
    if size == 0:
        raise ValueError("the batch is empty")
    return _SplitBatch(leaves, spec, batched, size)


def _example(split: _SplitBatch, example_leaves: tuple[Tensor, ...]) -> Batch:
    """Rebuild a batch of one from per-example tensors (each without its batch dimension)."""
    leaves = list(split.leaves)
    for position, leaf in zip(split.batched, example_leaves, strict=True):
        leaves[position] = leaf.unsqueeze(0)
    return optree.tree_unflatten(split.spec, leaves)  # type: ignore[return-value]


def _jacobians_and_logits(
    model_fn: ModelFn,
    params: Params,
    batch: Batch,
    *,
    chunk_size: int | None,
    method: str,  # validated here: the public functions pass whatever they were given
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example Jacobians and the logits ``(B, C)`` that come with them for free."""
    if not params:
        raise ValueError("params is empty: there is nothing to differentiate")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"method must be one of {JACOBIAN_METHODS}, got {method!r}")
    if method == "auto":
        return _auto_jacobians(model_fn, params, batch, chunk_size)
    split = _split_batch(batch)
    if method == "capture":
        chunk = split.size if chunk_size is None else chunk_size
        parts = [
            _captured_jacobians(model_fn, params, _rows(split, start, start + chunk))
            for start in range(0, split.size, chunk)
        ]
        jacobians = {name: torch.cat([jac[name] for jac, _ in parts]) for name in params}
        return jacobians, torch.cat([logits for _, logits in parts])

    def logits_of_one(p: Params, example_leaves: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        logits = model_fn(p, _example(split, example_leaves))
        if logits.ndim != 2 or logits.shape[0] != 1:
            raise ValueError(
                f"the model function must return logits (batch, classes); for one example it "
                f"returned shape {tuple(logits.shape)}"
            )
        return logits[0], logits[0].detach()

    def jacobian_of_one(*example_leaves: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return jacrev(logits_of_one, has_aux=True)(params, example_leaves)

    batched_leaves = [split.leaves[i] for i in split.batched]
    try:
        if method == "loop":
            per_example = [jacobian_of_one(*(leaf[b] for leaf in batched_leaves)) for b in range(split.size)]
            jacobians = {name: torch.stack([jac[name] for jac, _ in per_example]) for name in params}
            return jacobians, torch.stack([logits for _, logits in per_example])
        return vmap(jacobian_of_one, chunk_size=chunk_size)(*batched_leaves)
    except RuntimeError as error:
        if "setup_context" in str(error):  # an autograd.Function written for eager autograd only
            raise RuntimeError(
                f"method={method!r} differentiates with torch.func, which the model's custom "
                "autograd.Function (e.g. bitsandbytes' 4-bit matmul in QLoRA) does not support: use "
                "method='capture' (or 'auto', which takes it)"
            ) from error
        if method == "loop" or "vmap" not in str(error):
            raise
        raise RuntimeError(
            "vmap could not trace the model function for one example: its forward branches on tensor "
            "values (e.g. Hugging Face attention-mask shortcuts, bitsandbytes 4-bit layers); use "
            "method='capture' (what 'auto' tries first) or method='loop', or build the model with "
            "attn_implementation='eager' or pass a 4-D additive attention_mask (docs/predictive.md). "
            "Original error: "
            f"{error}"
        ) from error


def _rows(split: _SplitBatch, start: int, stop: int) -> Batch:
    """The examples ``start:stop`` of a split batch, as a batch."""
    leaves = list(split.leaves)
    for position in split.batched:
        leaves[position] = leaves[position][start:stop]
    return optree.tree_unflatten(split.spec, leaves)  # type: ignore[return-value]


def _captured_jacobians(model_fn: ModelFn, params: Params, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
    """``J[b, c] = sum_t g[c, b, t] a[b, t]^T`` from one captured forward and ``C`` pull-backs."""
    transposed: frozenset[str] = getattr(model_fn, "transposed", frozenset())
    mask = token_mask(batch)
    per_example = mask.shape[1] if mask.ndim == 3 else 1  # (batch, rows, tokens): rows of one example
    mask = mask.flatten(0, 1) if mask.ndim == 3 else mask
    logits, output_grads, inputs = capture(
        model_fn, params, batch, (mask.shape[0], mask.shape[1]), transposed=transposed
    )
    classes = logits.shape[-1]
    units = torch.eye(classes, dtype=logits.dtype, device=logits.device)
    # One pull-back per class in a loop, not vmap: faster here, and CPU attention's backward
    # has no batching rule (vmap would fall back to a slow path and warn).
    per_class = [output_grads(units[c].expand(logits.shape[0], -1)) for c in range(classes)]
    del output_grads  # frees the forward's saved activations before the Jacobians are formed
    jacobians = {}
    for name in params:
        x = inputs[name]  # (B, 1, i) for a layer with one row per example, e.g. a pooled head
        grads = torch.stack([g[name][:, : x.shape[1]] for g in per_class])
        if per_example > 1:  # the rows of one example are its positions
            x = x.unflatten(0, (-1, per_example)).flatten(1, 2)
            grads = grads.unflatten(1, (-1, per_example)).flatten(2, 3)
        jac = torch.einsum("cbto,bti->bcoi", grads, x)
        jacobians[name] = jac.transpose(-1, -2) if name in transposed else jac
    return jacobians, logits.detach()


def _auto_jacobians(
    model_fn: ModelFn, params: Params, batch: Batch, chunk_size: int | None
) -> tuple[dict[str, Tensor], Tensor]:
    """Jacobians by capture, else vmap, else a loop over the examples (each exact where it runs).

    Under ``torch.compile`` it is vmap (falling back means catching errors, which dynamo cannot trace).
    """
    if torch.compiler.is_compiling():
        return _jacobians_and_logits(model_fn, params, batch, chunk_size=chunk_size, method="vmap")
    try:
        return _jacobians_and_logits(model_fn, params, batch, chunk_size=chunk_size, method="capture")
    except (CaptureError, ValueError):  # e.g. a tied weight, or a bias (not a weight matrix)
        pass  # vmap reports a genuinely bad input (batch, logits shape) in its own words
    try:
        return _jacobians_and_logits(model_fn, params, batch, chunk_size=chunk_size, method="vmap")
    except RuntimeError as error:
        if "vmap" not in str(error) or "autograd.Function" in str(error):  # the loop would fail alike
            raise
    return _jacobians_and_logits(model_fn, params, batch, chunk_size=chunk_size, method="loop")
