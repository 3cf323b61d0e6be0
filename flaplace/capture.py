"""Layer inputs and output gradients of selected weights, captured without hooks.

The mechanism is kfac-jax's, carried to PyTorch. Inside the function being
transformed, a `torch.overrides.TorchFunctionMode` watches every
``F.linear`` (and ``torch.addmm``, the form of GPT-2's ``Conv1D``). When the
weight of the call *is* one of the selected tensors (by identity), it records
the layer input and adds a zero "probe" to the output. The forward is run under
`torch.func.vjp` with respect to the probes, so pulling a cotangent of the
logits back gives ``dL/dy`` at every selected layer. The recorded inputs leave
the transformed function as its auxiliary output, never through global state.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from torch.overrides import TorchFunctionMode

from flaplace.typing import Batch, ModelFn, Params


class CaptureError(RuntimeError):
    """A selected weight cannot be captured (never used, used twice, or used by an unknown op)."""


def output_dim(weight: Tensor, transposed: bool) -> int:
    """Output size ``o`` of a weight stored ``(o, i)``, or ``(i, o)`` when ``transposed``."""
    if weight.ndim != 2:
        raise ValueError(f"K-FAC needs 2-D weight matrices; got a tensor of shape {tuple(weight.shape)}")
    return weight.shape[1] if transposed else weight.shape[0]


class _ProbeMode(TorchFunctionMode):
    """Adds ``probes[name]`` to the output of each selected layer and records its input.

    ``records`` is a dict owned by the caller (created afresh for every call)
    that receives the inputs, reshaped to the probe's leading ``(batch, tokens)``.
    """

    def __init__(
        self,
        names_by_id: dict[int, str],
        probes: dict[str, Tensor],
        transposed: Collection[str],
        records: dict[str, Tensor],
        weights: Collection[Tensor] = (),
    ):
        super().__init__()
        #: target name -> the other operation that computed a tensor from it (e.g. an embedding).
        self.other_uses: dict[str, str] = {}
        self.names_by_id = names_by_id
        self.probes = probes
        self.transposed = transposed
        self.records = records
        #: (dtype, shape) of the targets. Under torch.compile, ``id()`` of an input tensor is a
        #: guard on that very object, so ``id()`` of a batch tensor would recompile every batch;
        #: a tensor of another dtype or shape is no target and needs no ``id()``.
        self.kinds: list[tuple[torch.dtype, tuple[int, ...]]] = []
        for w in weights:
            if (w.dtype, tuple(w.shape)) not in self.kinds:
                self.kinds.append((w.dtype, tuple(w.shape)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            via_addmm = False
        elif func is torch.addmm and len(args) >= 3:
            x, weight = args[1], args[2]
            via_addmm = True
        else:
            out = func(*args, **kwargs)
            self._note_other_use(func, args, kwargs, out)
            return out
        name = self.names_by_id.get(id(weight))
        if name is None:
            out = func(*args, **kwargs)
            self._note_other_use(func, args, kwargs, out)
            return out
        if name in self.other_uses:
            raise CaptureError(_two_uses(name, self.other_uses[name]))
        if via_addmm != (name in self.transposed):
            form = "y = x W (addmm)" if via_addmm else "y = W x (F.linear)"
            raise CaptureError(
                f"weight {name!r} is used as {form}, which does not match its declared layout; "
                "weights of Conv1D modules are transposed, all others are not"
            )
        if name in self.records:
            raise CaptureError(
                f"weight {name!r} is used more than once in one forward (tied or shared weights); "
                "K-FAC for shared weights is not supported, select only one of the tied copies"
            )
        out = func(*args, **kwargs)
        probe = self.probes[name]
        batch, tokens, width = probe.shape
        if out.numel() == batch * width and tokens > 1:
            # One row per example (a head on pooled features): the probe's first position.
            probe = probe[:, :1]
        elif out.numel() != probe.numel():
            raise CaptureError(
                f"output of {name!r} has shape {tuple(out.shape)}, which splits neither into "
                f"(batch, tokens) = {(batch, tokens)} nor into one row per example; "
                "pass a token mask matching the model's token layout"
            )
        shape = (batch, probe.shape[1], x.shape[-1])
        # The input itself when it has the probe's layout: layers fed the same tensor (q_proj and
        # v_proj of one attention block) then record the same object, and K-FAC shares their A.
        self.records[name] = x if x.shape == shape else x.reshape(shape)
        return out + probe.reshape(out.shape).to(out.dtype)

    def _may_be_target(self, leaf: Tensor) -> bool:
        return leaf.ndim == 2 and any(
            leaf.dtype == dtype and leaf.shape[0] == shape[0] and leaf.shape[1] == shape[1]
            for dtype, shape in self.kinds
        )

    def _note_other_use(self, func, args, kwargs, out) -> None:
        """Record a target weight that reaches an operation other than its linear layer.

        Only operations that compute a new tensor from the weight count: metadata
        (``.shape``, ``.dtype``, ``.size()``) and no-op conversions that return the weight
        itself do not. Such a use (a tied input embedding, a weight norm, a transpose feeding
        a matmul) contributes to the output through a path the capture cannot see.
        """
        if not self.names_by_id:
            return
        leaves = [*args, *kwargs.values()]
        for leaf in list(leaves):
            if isinstance(leaf, list | tuple):
                leaves.extend(leaf)
        compiling = torch.compiler.is_compiling()
        for leaf in leaves:
            if not isinstance(leaf, Tensor) or (compiling and not self._may_be_target(leaf)):
                continue
            name = self.names_by_id.get(id(leaf))
            if name is None or name in self.other_uses:
                continue
            results = out if isinstance(out, list | tuple) else (out,)
            if any(isinstance(r, Tensor) and r is not leaf for r in results):
                self.other_uses[name] = _operation_name(func)
                if name in self.records:
                    raise CaptureError(_two_uses(name, self.other_uses[name]))


def _operation_name(func: object) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and module != "torch._C" else str(name)


def _two_uses(name: str, other: str) -> str:
    return (
        f"weight {name!r} is used by its linear layer (F.linear/addmm) and also by {other} "
        "(e.g. an input embedding tied to the output head); K-FAC and the captured Jacobians "
        "would miss the second use: select only weights used once, e.g. exclude the tied head"
    )


def capture(
    model_fn: ModelFn,
    params: Params,
    batch: Batch,
    token_shape: tuple[int, int],
    *,
    targets: Collection[str] | None = None,
    transposed: Collection[str] = frozenset(),
) -> tuple[
    Float[Tensor, "batch classes"],
    Callable[[Tensor], dict[str, Tensor]],
    dict[str, Float[Tensor, "rows _ _"]],  # rows: batch x sequences per example
]:
    """Run ``model_fn`` once, capturing each target weight's layer input and output-gradient map.

    Args:
        model_fn: ``f(params, batch) -> logits``; it must pass the tensors of
            ``params`` to the layers unchanged (as ``functional_call`` does).
        params: the adapted weights.
        batch: one batch.
        token_shape: ``(batch, tokens)``, the leading shape of every target
            layer's output (``token_mask(batch).shape`` for sequence models).
        targets: names of the weights to capture (default: all of ``params``).
        transposed: names of weights stored ``(in, out)`` and used through ``addmm``.

    Returns:
        ``(logits, output_grads, inputs)``: ``output_grads(cotangent)`` maps a
        cotangent of the logits, shape ``(batch, classes)``, to
        ``{name: dL/dy}`` of shape ``(batch, tokens, o)``; it may be called
        repeatedly and ``torch.func.vmap``-ed over several cotangents.
        ``inputs[name]`` has shape ``(batch, tokens, i)``, or ``(batch, 1, i)`` for a layer
        that sees one row per example (e.g. a classification head on pooled features); its
        output gradients then sit at position 0 and are zero elsewhere. Layers fed the same
        tensor get the same input object (``inputs[a] is inputs[b]``).

    Raises:
        CaptureError: a target is never used, used twice, or used in the wrong layout.

    Examples:
        >>> logits, output_grads, inputs = capture(f, params, batch, tuple(token_mask(batch).shape))  # doctest: +SKIP
        >>> grads = output_grads(torch.ones_like(logits))  # doctest: +SKIP
    """
    names = list(params) if targets is None else list(targets)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"target {missing[0]!r} is not in params")
    transposed = frozenset(transposed)
    names_by_id = {id(params[n]): n for n in names}
    if len(names_by_id) != len(names):
        raise CaptureError("two target names refer to the same tensor (tied weights)")
    # A zero of the output's shape, expanded from one element: no memory, no fill.
    probes = {
        n: params[n].new_zeros(()).expand(*token_shape, output_dim(params[n], n in transposed)) for n in names
    }

    def forward(probes: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        records: dict[str, Tensor] = {}
        mode = _ProbeMode(names_by_id, probes, transposed, records, [params[n] for n in names])
        with mode:
            logits = model_fn(params, batch)
        if mode.other_uses:
            name, other = next(iter(mode.other_uses.items()))
            if name in records:
                raise CaptureError(_two_uses(name, other))
        unused = [n for n in names if n not in records]
        if unused:
            raise CaptureError(
                f"{len(unused)} selected weight(s) never reached F.linear/addmm in the forward, "
                f"e.g. {unused[0]!r}; they are unused, or used by an operation flaplace cannot capture"
                + (f" ({mode.other_uses[unused[0]]})" if unused[0] in mode.other_uses else "")
            )
        return logits, records

    # Under an outer no_grad, torch.func.vjp still differentiates with respect to the probes
    # (function transforms ignore it), but autograd records nothing for model weights that
    # happen to require grad: no graph, no memory for gradients nobody asked for.
    with torch.no_grad():
        logits, pullback, inputs = torch.func.vjp(forward, probes, has_aux=True)  # type: ignore[misc]

    def output_grads(cotangent: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return pullback(cotangent)[0]

    return logits, output_grads, inputs
