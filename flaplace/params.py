"""Adapted weights as a pytree, and the model function built on ``functional_call``."""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call

from flaplace.capture import refuse_uncapturable
from flaplace.evaluation import plain_evaluation
from flaplace.sharding import unwrap_model
from flaplace.typing import Batch, Params

#: Batch keys that are targets or bookkeeping, never passed to the model.
NON_INPUT_KEYS: frozenset[str] = frozenset({"labels", "label", "targets"})


def select_params(
    model: nn.Module,
    include: str | Sequence[str] | Callable[[str, Tensor], bool] = "lora",
    *,
    exclude: str | Sequence[str] = (),
) -> Params:
    """Select the adapted weights of ``model`` as a dict pytree ``{name: tensor}``.

    Args:
        model: any module, e.g. a PEFT ``PeftModel``.
        include: case-insensitive keyword(s) that a parameter's full name must
            contain (any of them), or a predicate ``(name, tensor) -> bool``.
            Every keyword must match at least one parameter.
        exclude: case-insensitive keyword(s) that drop a parameter.

    Returns:
        The selected parameters, detached (sharing storage with the model),
        in the model's own order. A wrapped model (DDP, ``torch.compile``) is
        unwrapped first (`unwrap_model`), so names carry no ``module.`` prefix.

    Raises:
        ValueError: nothing is selected, a keyword matches no parameter, or a selected weight
            belongs to a DoRA layer or is LoRA on an embedding
            ([`refuse_uncapturable`][flaplace.capture.refuse_uncapturable]).

    Examples:
        >>> params = select_params(peft_model, "lora")  # lora_A and lora_B weights  # doctest: +SKIP
    """
    model = unwrap_model(model)
    named = dict(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters to select from")
    excl = [exclude.lower()] if isinstance(exclude, str) else [k.lower() for k in exclude]
    if callable(include):
        chosen = [n for n, p in named.items() if include(n, p)]
    else:
        keywords = [include] if isinstance(include, str) else list(include)
        if not keywords:
            raise ValueError("include needs at least one keyword")
        for kw in keywords:
            if not any(kw.lower() in n.lower() for n in named):
                sample = ", ".join(list(named)[:5])
                raise ValueError(
                    f"keyword {kw!r} matches no parameter of {type(model).__name__} "
                    f"(names look like: {sample}, ...)"
                )
        chosen = [n for n in named if any(kw.lower() in n.lower() for kw in keywords)]
    chosen = [n for n in chosen if not any(k in n.lower() for k in excl)]
    if not chosen:
        raise ValueError(f"no parameter of {type(model).__name__} was selected")
    refuse_uncapturable(model, chosen)
    return {n: named[n].detach() for n in chosen}


def transposed_weights(model: nn.Module, names: Iterable[str]) -> frozenset[str]:
    """Names among ``names`` that are stored ``(in, out)`` and used as ``y = x W``.

    These are the weights of GPT-2-style ``Conv1D`` modules (any module class
    named ``Conv1D`` whose weight has ``nf`` columns).
    """
    modules = dict(model.named_modules())
    out = set()
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is not None and type(module).__name__ == "Conv1D" and leaf == "weight":
            out.add(name)
    return frozenset(out)


def model_inputs(batch: Batch) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """Split a batch into the model's positional and keyword arguments.

    A mapping is passed as keyword arguments without its target keys
    (`NON_INPUT_KEYS`); a tuple ``(inputs, targets)`` passes ``inputs``.
    """
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
    if isinstance(batch, tuple | list) and batch:
        return (batch[0],), {}
    raise TypeError(
        f"a batch is a mapping of tensors or a tuple (inputs, targets); got {type(batch).__name__}"
    )


def batch_targets(batch: Batch) -> Tensor:
    """The targets of a batch: ``batch["labels"]`` for a mapping, ``batch[-1]`` for a tuple."""
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "targets"):
            if key in batch:
                return batch[key]
        raise KeyError("the batch has no 'labels' entry; the empirical Fisher needs targets")
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[-1]
    raise KeyError("the batch has no targets: pass (inputs, targets) or a mapping with 'labels'")


def token_mask(batch: Batch) -> Tensor:
    """The positions of a batch that hold real tokens, ``(batch, tokens)`` bool.

    A mapping with ``attention_mask`` gives it; one with ``input_ids`` gives all
    ones of its shape. A tuple ``(x, ...)`` has one position per example when
    ``x`` is 2-D (``(batch, features)``) and ``x.shape[1]`` positions when it
    is 3-D or more (``(batch, tokens, features)``).
    """
    if isinstance(batch, Mapping):
        if "attention_mask" in batch:
            return batch["attention_mask"].bool()
        if "input_ids" in batch:
            ids = batch["input_ids"]
            return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        raise KeyError("cannot find token positions: the batch has no attention_mask or input_ids")
    x = batch[0]
    tokens = x.shape[1] if x.ndim >= 3 else 1
    return torch.ones((x.shape[0], tokens), dtype=torch.bool, device=x.device)


def logits_of(output: object) -> Tensor:
    """The logits tensor of a model output (a tensor, or an object with ``.logits``)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
    return logits


class LastTokenLogits:
    """Output function: the logits of given answer tokens at the last real position.

    Works with left and right padding: the last position is read from the
    batch's ``attention_mask`` when it has one.

    Examples:
        >>> output_fn = LastTokenLogits(answer_token_ids(tokenizer, ["A", "B"]))  # doctest: +SKIP
    """

    def __init__(self, token_ids: Sequence[object] | Tensor, *, vocab_size: int | None = None):
        ids = _token_id_list(token_ids)
        if not ids:
            raise ValueError("LastTokenLogits needs at least one answer token id")
        negative = [i for i in ids if i < 0]
        if negative:
            raise ValueError(
                f"token_ids must be non-negative vocabulary indices, got {negative[0]} "
                "(a negative id would silently index from the end of the vocabulary)"
            )
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(
                f"token_ids has duplicate id(s) {repeated}: each answer needs its own token "
                "(two equal ids split the probability between identical classes)"
            )
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(f"token id {max(ids)} is out of range for vocab_size {vocab_size}")
        self.token_ids = torch.tensor(ids, dtype=torch.long)
        self._largest = max(ids)

    def __call__(self, output: object, batch: Batch) -> Float[Tensor, "batch classes"]:
        logits = logits_of(output)
        if logits.ndim != 3:
            raise ValueError(f"expected token logits (batch, tokens, vocab), got {tuple(logits.shape)}")
        if self._largest >= logits.shape[2]:
            raise ValueError(
                f"token id {self._largest} of LastTokenLogits is out of range for the model's "
                f"vocabulary of {logits.shape[2]} tokens; use ids of the model's tokenizer"
            )
        if logits.shape[1] == 1:  # one position per example: the model kept only the last one
            rows = logits[:, 0]
        else:
            last = last_positions(batch, logits.shape[1], logits.device)
            # gather, not advanced indexing: its backward is a scatter into one zero buffer.
            rows = logits.gather(1, last[:, None, None].expand(-1, 1, logits.shape[2]))[:, 0]
        return rows[:, self.token_ids.to(logits.device)]

    def model_kwargs(self, batch: Batch) -> dict[str, Tensor]:
        """Extra model arguments: Hugging Face's ``logits_to_keep``, the last position of each example.

        A `ModelFunction` passes them to models that accept them, so that the language
        model head projects one position per example instead of every position.

        Examples:
            >>> LastTokenLogits([3, 5]).model_kwargs({"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
            {'logits_to_keep': tensor([[5], [7]])}  # (batch, 1): each example's last real position
        """
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch[0]
        return {"logits_to_keep": last_positions(batch, ids.shape[1], ids.device)[:, None]}


def last_positions(batch: Batch, length: int, device: torch.device) -> Int[Tensor, " batch"]:
    """Index of the last real token of each example (``length - 1`` without a mask)."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        mask = batch["attention_mask"].to(device)
        check_rows(mask)
        positions = torch.arange(mask.shape[1], device=device)
        return (mask.bool() * positions).amax(dim=1)
    n = len(batch["input_ids"]) if isinstance(batch, Mapping) else len(batch[0])
    return torch.full((n,), length - 1, dtype=torch.long, device=device)


def check_rows(mask: Tensor, what: str = "the batch") -> None:
    """Refuse a token mask with no rows or with a row of padding only.

    An all-padding example has no last token and no real input: it would count in the
    log-likelihood and get a zero predictive variance. Checked on plain tensors only (not
    inside ``vmap`` or ``torch.compile``, where the values are not known).

    Raises:
        ValueError: naming the rows to drop.

    Examples:
        >>> check_rows(torch.tensor([[1, 1], [0, 1]]))  # fine
    """
    if mask.ndim != 2 or torch.compiler.is_compiling() or _is_transformed(mask):
        return
    if mask.shape[0] == 0:
        raise ValueError(f"{what} has 0 rows (examples); drop empty batches")
    empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"row(s) {empty[:5]} of {what} have no real token (attention_mask all 0); "
            "drop all-padding examples"
        )


def _is_transformed(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform (its values are then not readable)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def _token_id_list(token_ids: Sequence[object] | Tensor) -> list[int]:
    """Answer token ids as Python ints; floats and booleans are refused (they would be truncated)."""
    if isinstance(token_ids, Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be integers, got a tensor of {token_ids.dtype}")
        return [int(i) for i in token_ids.reshape(-1).tolist()]
    ids = []
    for value in token_ids:
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
            value = value.item()
        try:
            if isinstance(value, bool):
                raise TypeError
            ids.append(operator.index(value))  # type: ignore[arg-type]  # ints, numpy ints; not floats
        except TypeError:
            raise TypeError(
                f"token_ids must be integers (token ids of the tokenizer), got {value!r} "
                f"of type {type(value).__name__}"
            ) from None
    return ids


def classifier_logits(output: object, batch: Batch) -> Float[Tensor, "batch classes"]:
    """Output function for classification heads: the model's ``(batch, classes)`` logits."""
    logits = logits_of(output)
    if logits.ndim != 2:
        raise ValueError(f"expected classifier logits (batch, classes), got {tuple(logits.shape)}")
    return logits


OutputFn = Callable[[object, Batch], Tensor]


class ModelFunction:
    """``f(params, batch) -> logits``: ``model`` evaluated with ``functional_call``.

    Only the adapted weights are swapped in; every other weight and buffer is
    the module's own. ``transposed`` lists the selected weights stored as
    ``(in, out)`` (GPT-2 ``Conv1D``), found from the module structure.

    The model is evaluated in eval mode (dropout off), whatever mode it is in: each call
    switches the modules that are training to eval and back afterwards, so factors and
    predictives are deterministic. [`training`][flaplace.params.ModelFunction.training] gives
    the same function with the modules left in their own modes, for fitting the MAP with
    dropout as the model is configured. A wrapped model
    (DDP, ``torch.compile``) is unwrapped ([`unwrap_model`][flaplace.sharding.unwrap_model]).
    What training left on the model (accelerate's mixed-precision forward, gradient
    checkpointing, the input-require-grads hook's call) is off inside each call and
    restored after it ([`plain_evaluation`][flaplace.evaluation.plain_evaluation]): the model
    runs in the dtype of its weights.

    When the output function reads a few positions only (`LastTokenLogits`) and the
    model is a Hugging Face language model that takes per-example ``logits_to_keep``
    positions, those are passed (``trim_logits=True``): the head then projects one position
    per example instead of all ``tokens``, which saves the ``(batch, tokens, vocab)`` logits,
    their gradient, and the head's matrix products over every position. This is switched
    off when a selected weight belongs to the head itself. A model that takes ``use_cache``
    is asked for no key/value cache (``use_cache=False``), which it would otherwise build for
    generation on every call.

    Examples:
        >>> params = select_params(model, "lora")  # doctest: +SKIP
        >>> f = ModelFunction(model, params, classifier_logits)  # doctest: +SKIP
        >>> logits = f(params, {"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        params: Params | Iterable[str],
        output_fn: OutputFn = classifier_logits,
        *,
        trim_logits: bool = True,
        eval_mode: bool = True,
    ):
        names = list(params)
        model = unwrap_model(model)
        known = dict(model.named_parameters())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{len(unknown)} name(s) are not parameters of the model, e.g. {unknown[0]!r}")
        refuse_uncapturable(model, names)
        self.model = model
        self.names = tuple(names)
        self.output_fn = output_fn
        self.transposed = transposed_weights(model, names)
        # Other names of the same tensors (tied weights), found once here: functional_call then
        # needs no per-call search of the whole module tree (tie_weights=False below).
        by_tensor: dict[int, list[str]] = {}
        for name, tensor in model.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(tensor), []).append(name)
        self.aliases = {
            n: tuple(a for a in by_tensor[id(known[n])] if a != n)
            for n in names
            if len(by_tensor[id(known[n])]) > 1
        }
        self.trim_logits = trim_logits and _keeps_positions(model, names, output_fn)
        # A decoder builds a key/value cache for generation by default: copies of every layer's
        # keys and values, 2 to 9 % of a Llama forward (hidden 256, 128 tokens), never read here.
        self.no_cache = "use_cache" in _forward_parameters(model)
        self.eval_mode = eval_mode

    def training(self) -> ModelFunction:
        """The same function, evaluating the modules in their own modes (dropout on in training mode).

        For fitting the MAP: call ``model.train()`` and train through ``f.training()``; the
        curvature and the predictive use ``f`` itself, in eval mode.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train()
            >>> f = ModelFunction(net, ["0.weight"], lambda out, batch: out)
            >>> x = {"input": torch.ones(4, 3)}
            >>> params = {"0.weight": net[0].weight}
            >>> bool((f(params, x) == f(params, x)).all())  # eval mode: deterministic
            True
            >>> f.training().eval_mode, f.eval_mode
            (False, True)
        """
        clone = copy.copy(self)
        clone.eval_mode = False
        return clone

    def __call__(self, params: Params, batch: Batch) -> Float[Tensor, "batch ..."]:
        return self.evaluate(params, batch)

    def evaluate(self, params: Params, batch: Batch) -> Tensor:
        """The output function's result for ``batch`` at ``params``, whatever its shape.

        ``__call__`` is this with the shape of classification logits; subclasses for other
        outputs (token logits) reuse it: the weight swap, the tied names, the trimmed logits
        and the eval mode are the same.

        Examples:
            >>> import torch
            >>> net = torch.nn.Linear(3, 2)
            >>> f = ModelFunction(net, ["weight"], lambda out, batch: out)
            >>> f.evaluate({"weight": torch.zeros(2, 3)}, {"input": torch.ones(1, 3)}).shape
            torch.Size([1, 2])
        """
        args, inputs = model_inputs(batch)
        kwargs: dict[str, object] = dict(inputs)
        if self.aliases:
            params = dict(params)
            for name, others in self.aliases.items():
                if name in params:
                    params.update(dict.fromkeys(others, params[name]))
        if self.trim_logits and "logits_to_keep" not in kwargs:
            kwargs.update(self.output_fn.model_kwargs(batch))  # type: ignore[attr-defined]
        if self.no_cache and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # no key/value cache: nothing here generates
        # Eval mode (dropout would make f random), no autocast, no checkpointing: see plain_evaluation.
        with plain_evaluation(self.model, eval_mode=self.eval_mode):
            output = functional_call(self.model, params, args, kwargs, tie_weights=False)
        return self.output_fn(output, batch)


def _forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The parameters of ``model.forward``, or of the base model's for a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    try:
        return inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature
        return {}


def _keeps_positions(model: nn.Module, names: Sequence[str], output_fn: OutputFn) -> bool:
    """Whether ``model`` can be asked for the logits of ``output_fn``'s positions only."""
    if not callable(getattr(output_fn, "model_kwargs", None)):
        return False
    try:  # per-example positions ((batch, k) integer tensors) arrived with this helper
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    if "logits_to_keep" not in _forward_parameters(model):
        return False
    get_base = getattr(model, "get_base_model", None)
    get_head = getattr(get_base() if callable(get_base) else model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return False
    prefixes = [f"{name}." for name, module in model.named_modules() if module is head]
    return not any(n.startswith(p) for n in names for p in prefixes)
