"""Layer inputs and output gradients of selected weights, captured without hooks.

The mechanism is kfac-jax's, carried to PyTorch. Inside the function being
transformed, a `torch.overrides.TorchFunctionMode` watches every
``F.linear`` (and ``torch.addmm``, the form of GPT-2's ``Conv1D``). When the
weight of the call *is* one of the selected tensors (by identity), it records
the layer input and adds a zero "probe" to the output. The forward is
differentiated with respect to the probes, so pulling a cotangent of the
logits back gives ``dL/dy`` at every selected layer. The recorded inputs leave
the function as its auxiliary output, never through global state.

In eager mode the probes are leaf tensors that require grad, the weights go in
detached and ``torch.autograd.grad`` pulls back; under ``torch.compile``, inside
another ``torch.func`` transform or in inference mode, the forward runs under
`torch.func.vjp` instead (same results; the eager form skips the transform's
wrapping of every tensor downstream of a probe, a few percent of a K-FAC update).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from flaplace.typing import Batch, ModelFn, Params

#: argument containers whose elements `_ProbeMode` checks for target weights
_SEQUENCES = (list, tuple)


class CaptureError(RuntimeError):
    """A selected weight cannot be captured (never used, used twice, or used by an unknown op)."""


def output_dim(weight: Tensor, transposed: bool, name: str | None = None) -> int:
    """Output size ``o`` of a weight stored ``(o, i)``, or ``(i, o)`` when ``transposed``.

    Raises:
        ValueError: ``weight`` is not 2-D (naming ``name`` when given).
    """
    if weight.ndim != 2:
        what = "a selected weight" if name is None else repr(name)
        raise ValueError(
            f"K-FAC needs 2-D weight matrices, but {what} has shape {tuple(weight.shape)} (a vector such "
            "as a bias, a norm's scale or DoRA's magnitude); leave it out with exclude=<a keyword of its name>"
        )
    return weight.shape[1] if transposed else weight.shape[0]


def refuse_uncapturable(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse selected weights whose curvature K-FAC cannot represent: DoRA layers, LoRA on embeddings.

    * A PEFT layer with ``use_dora=True`` scales each output by ``magnitude / ||W0 + s B A||``,
      the norm of a whole row of the adapted weight. The per-example gradient of ``lora_A`` or
      ``lora_B`` then holds, besides the layer-input x output-gradient product, a term from that
      norm (the input projected off the weight row, a different projection for every output), so
      no Kronecker factorisation holds, not even for one example and one token.
    * PEFT applies LoRA on an ``nn.Embedding`` (``lora_embedding_A``/``lora_embedding_B``) by a
      lookup and a matrix product, which the capture does not see as a linear layer.

    Args:
        model: the module the names belong to.
        names: the selected parameter names.

    Raises:
        ValueError: one line naming the first such weight, why, and what to select instead.

    Examples:
        >>> import torch
        >>> refuse_uncapturable(torch.nn.Linear(2, 2), ["weight"])  # a plain layer: nothing to refuse
    """
    names = list(names)
    for owner, module in model.named_modules():
        use_dora = getattr(module, "use_dora", None)
        dora = {a for a, on in use_dora.items() if on} if isinstance(use_dora, Mapping) else set()
        if not dora and not getattr(module, "lora_embedding_A", None):
            continue
        prefix = f"{owner}." if owner else ""
        for name in names:
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split(".")
            if parts[0].startswith("lora_embedding_"):
                raise ValueError(
                    f"{name!r} is LoRA on the embedding {owner!r}, which PEFT applies by a lookup, not "
                    'a linear layer, so K-FAC cannot capture it; leave it out with exclude="embed" '
                    "(or drop the embedding from the LoRA target_modules)"
                )
            adapter = parts[1] if parts[0].startswith("lora_") and len(parts) > 1 else None
            if dora and (adapter is None or adapter in dora):
                raise ValueError(
                    f"{name!r} belongs to the DoRA layer {owner!r} (use_dora=True): DoRA divides each "
                    "output by the norm of its whole weight row, so the per-example gradient is no "
                    "input x output-gradient product and K-FAC cannot represent it; merge the adapter "
                    "(merge_and_unload()) and select full weights of the merged model (see the DoRA "
                    "section of the Hugging Face page)"
                )


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
        positions: Tensor | None = None,
        tokens: int = 1,
        weights: Collection[Tensor] = (),
        in_place: bool = False,
    ):
        super().__init__()
        #: target name -> the other operation that computed a tensor from it (e.g. an embedding).
        self.other_uses: dict[str, str] = {}
        self.names_by_id = names_by_id
        self.probes = probes
        self.transposed = transposed
        self.records = records
        #: one position per row: the probes sit there only, ``(rows, 1, o)`` (see `capture`)
        self.positions = positions
        self.tokens = tokens
        #: place the positions' probes into the layer's fresh output in place (plain autograd
        #: only: no copy of the output; ``torch.func`` transforms keep the out-of-place form)
        self.in_place = in_place
        #: asked once per forward, not once per operation (a few hundred calls per layer)
        self.compiling = torch.compiler.is_compiling()
        #: (dtype, shape) of the targets. Under torch.compile, ``id()`` of an input tensor is a
        #: guard on that very object, so ``id()`` of a batch tensor would recompile every batch;
        #: a tensor of another dtype or shape is no target and needs no ``id()``.
        self.kinds: set[tuple[torch.dtype, int, int]] = {(w.dtype, *w.shape) for w in weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Called for every torch function of the forward (about 125 per decoder layer, attribute
        # reads included), so the common case, an operation that involves no target weight, is
        # kept to a call and one look-up per argument: no method call, no generator.
        if kwargs is None:
            kwargs = {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            via_addmm = False
        elif func is torch.addmm and len(args) >= 3:
            x, weight = args[1], args[2]
            via_addmm = True
        else:
            weight = None
        name = None if weight is None else self.names_by_id.get(id(weight))
        if name is None:  # no target weight in a layer's place: pass the call on, note other uses
            out = func(*args, **kwargs)
            if self.compiling:
                mentioned = self._mentions_target(args, kwargs)
            else:
                mentioned, ids = False, self.names_by_id
                for leaf in (*args, *kwargs.values()) if kwargs else args:
                    if id(leaf) in ids or (isinstance(leaf, _SEQUENCES) and any(id(v) in ids for v in leaf)):
                        mentioned = True
                        break
            if mentioned:
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
        if self.positions is not None and out.numel() == batch * self.tokens * width and self.tokens > 1:
            # The probe at one position per row: its gradient is that position's output gradient
            # alone, so the pull-back never holds a (rows, tokens, o) gradient per layer.
            shape = (batch, self.tokens, x.shape[-1])
            self.records[name] = x if x.shape == shape else x.reshape(shape)
            rows = torch.arange(batch, device=out.device)
            at = (rows, self.positions)
            if self.in_place and out.shape == (batch, self.tokens, width):
                # `out` is new and held by no one else, and F.linear's backward does not read it
                return out.index_put_(at, probe[:, 0].to(out.dtype), accumulate=True)
            placed = out.reshape(batch, self.tokens, width).index_put(
                at, probe[:, 0].to(out.dtype), accumulate=True
            )
            return placed.reshape(out.shape)
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

    def _mentions_target(self, args: tuple, kwargs: dict) -> bool:
        """Under ``torch.compile``: whether a target weight is an argument (or an element of a
        list/tuple argument); ``id()`` only of tensors that can be targets (see ``kinds``).

        Plain loops: dynamo interprets this for every operation of the forward, and
        comprehensions and generators cost it several times more.
        """
        ids = self.names_by_id
        for values in (args, kwargs.values()):
            for value in values:
                if isinstance(value, _SEQUENCES):
                    for v in value:
                        if isinstance(v, Tensor) and self._may_be_target(v) and id(v) in ids:
                            return True
                elif isinstance(value, Tensor) and self._may_be_target(value) and id(value) in ids:
                    return True
        return False

    def _may_be_target(self, leaf: Tensor) -> bool:
        return leaf.ndim == 2 and (leaf.dtype, leaf.shape[0], leaf.shape[1]) in self.kinds

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
        compiling = self.compiling
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
    positions: Tensor | None = None,
) -> tuple[
    Float[Tensor, "..."],  # (batch, classes); token logits keep more axes
    Callable[..., dict[str, Tensor]],
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
        positions: optional ``(batch,)`` token index per row: the output gradients are then
            taken at that position only and have shape ``(batch, 1, o)`` (K-FAC's
            ``sharing="last"`` needs nothing else, and the pull-back then never holds a full
            ``(batch, tokens, o)`` gradient of every layer at once). Inputs keep every position.

    Returns:
        ``(logits, output_grads, inputs)``: ``output_grads(cotangent)`` maps a
        cotangent of the logits, shape ``(batch, classes)``, to
        ``{name: dL/dy}`` of shape ``(batch, tokens, o)``; it may be called
        repeatedly and ``torch.func.vmap``-ed over several cotangents, until a call with
        ``last=True``, which frees the forward's saved activations during its backward.
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
    probe_shape = token_shape if positions is None else (token_shape[0], 1)
    probes = {
        n: params[n].new_zeros(()).expand(*probe_shape, output_dim(params[n], n in transposed, n))
        for n in names
    }

    plain = _plain_autograd()

    def forward(probes: dict[str, Tensor], params: Params = params) -> tuple[Tensor, dict[str, Tensor]]:
        records: dict[str, Tensor] = {}
        weights = [params[n] for n in names]
        mode = _ProbeMode(
            names_by_id, probes, transposed, records, positions, token_shape[1], weights, in_place=plain
        )
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
                + "; leave them out with select_params(..., exclude=<a keyword of their names>)"
            )
        return logits, records

    if plain:
        return _capture_with_autograd(forward, params, names, names_by_id, probes)

    # Under an outer no_grad, torch.func.vjp still differentiates with respect to the probes
    # (function transforms ignore it), but autograd records nothing for model weights that
    # happen to require grad: no graph, no memory for gradients nobody asked for.
    with torch.no_grad():
        logits, pullback, inputs = torch.func.vjp(forward, probes, has_aux=True)  # type: ignore[misc]

    def output_grads(cotangent: Tensor, *, last: bool = False) -> dict[str, Tensor]:
        with torch.no_grad():
            # The last pull-back frees each saved activation as soon as the backward has used it
            # (as autograd's own backward does), so that the backward's buffers reuse that memory.
            return pullback(cotangent, retain_graph=not last)[0]

    return logits, output_grads, inputs


def _plain_autograd() -> bool:
    """Whether `capture` may differentiate with plain autograd: eager, outside every ``torch.func`` transform.

    ``torch.func.vjp`` wraps every tensor that depends on a probe and dispatches each of the
    forward's and the backward's operations through its transform layer, which costs a few
    percent of a K-FAC update. Under ``torch.compile`` (which traces ``torch.func`` without graph
    breaks), inside another transform, or in inference mode, the ``vjp`` form is used instead.
    """
    return (
        not torch.compiler.is_compiling()
        and not torch.is_inference_mode_enabled()
        and torch._C._functorch.maybe_current_level() is None
    )


def _capture_with_autograd(
    forward: Callable[..., tuple[Tensor, dict[str, Tensor]]],
    params: Params,
    names: list[str],
    names_by_id: dict[int, str],
    probes: dict[str, Tensor],
) -> tuple[Tensor, Callable[..., dict[str, Tensor]], dict[str, Tensor]]:
    """`capture`'s result with autograd: the probes are leaves that require grad.

    The parameters go in detached, so that autograd records nothing for them: only the
    operations downstream of a probe (or of another weight that requires grad) are recorded,
    and the pull-backs compute the probes' gradients only.
    """
    detached = {k: v.detach() for k, v in params.items()}
    names_by_id.clear()  # the mode recognises the targets by identity: the detached tensors now
    names_by_id.update({id(detached[n]): n for n in names})
    leaves = [probes[n].requires_grad_() for n in names]
    with torch.enable_grad():
        logits, records = forward(probes, detached)
    shared: dict[int, Tensor] = {}  # one detached tensor per recorded object: shared inputs stay shared
    inputs = {n: shared.setdefault(id(x), x.detach()) for n, x in records.items()}

    def output_grads(cotangent: Tensor, *, last: bool = False) -> dict[str, Tensor]:
        if not logits.requires_grad:  # no target reaches the logits
            return {
                n: torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                for n, p in zip(names, leaves, strict=True)
            }
        grads = torch.autograd.grad(
            logits, leaves, cotangent, retain_graph=not last, allow_unused=True, materialize_grads=True
        )
        return dict(zip(names, grads, strict=True))

    return logits.detach(), output_grads, inputs
