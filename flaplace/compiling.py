"""Compiling the K-FAC ``update``: one compilation per batch shape, none for new data.

``torch.compile(update)`` traces the whole update (the model's forward under
``torch.func.vjp``, the pull-backs and the factor products) into one graph. Its
first call pays for the compilation; later calls with batches of the same shape
reuse it, whatever the data. Each new ``(batch, tokens)`` shape compiles once more
(Hugging Face's mask code makes the graph shape-specific even when dynamo marks the
sizes dynamic), so pad to a fixed length and drop or pad the last partial batch.

Examples:
    >>> init, update = flaplace.build(model_fn, fisher="exact", lr_threshold=None)
    >>> fast = compile_update(update)
    >>> state = init(params)
    >>> for batch in loader:  # doctest: +SKIP
    ...     state = fast(state, params, batch)  # compiles on the first batch only
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flaplace.kfac_state import KFACState
from flaplace.tokens import token_labels


def compile_update(
    update: Callable[..., KFACState], *, backend: str | Callable = "inductor", **options: Any
) -> Callable[..., KFACState]:
    """``torch.compile`` the ``update`` of [`build`][flaplace.kfac.build] for a K-FAC fit.

    The defaults: ``dynamic=False`` (each batch shape gets its own static graph; dynamo's
    automatic dynamic shapes would trace a symbolic graph on the second shape, which is
    slower to build and still shape-specific for Hugging Face models) and
    ``fullgraph=True`` (the update traces in one graph; a break is an error, not a silent
    slow-down).

    Args:
        update: the ``update`` of ``flaplace.build(...)``, built without a ``generator``.
        backend: the ``torch.compile`` backend: ``"inductor"`` (fused kernels; the first
            call compiles C++ or Triton kernels), ``"aot_eager"`` or ``"eager"`` (traced
            only: a first call several times cheaper, little speed-up afterwards).
        **options: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``,
            ``options``, ...).

    With inductor and neither ``mode`` nor ``options`` given, weights on the CPU are compiled
    with inductor's ``cpp_wrapper`` (the kernels' caller is C++ too, so the graph becomes two
    C++ files, the caller built at ``-O1`` and the kernels at ``-O3``, instead of one file per
    fused kernel) and, where PyTorch's own kernels run on a vector instruction set
    (``torch.backends.cpu.get_cpu_capability()`` is e.g. ``"AVX2"`` or ``"AVX512"``), without
    inductor's start-up probes of that instruction set (``cpp.vec_isa_ok``; each probe compiles
    the vector headers, about 1 s apiece on 2 cores). Together these halved the first call of a
    2-layer Llama update on 2 cores (28 s to 13 s) at the same speed afterwards. The choice is
    made on the first call, from the device of ``params``; the environment variable
    ``TORCHINDUCTOR_VEC_ISA_OK`` still decides where it is set. Should the compilation fail with
    the probes skipped (a C++ compiler too old for the instruction set), the update is compiled
    again with them, with a warning.

    Returns:
        The compiled ``update(state, params, batch) -> state``. Pass the same ``params``
        tensors to every call: the capture recognises the selected weights by identity,
        so new tensors compile again.

    Causal-LM token labels (see [`flaplace.tokens`][flaplace.tokens]) need
    ``fullgraph=False``: the number of supervised tokens depends on the labels, so the graph
    breaks where they are selected, and the vocabulary-sized steps (softmax, sampling,
    log-likelihood, in place over one ``(n_supervised, vocab)`` buffer) run eagerly between the
    compiled pieces. Use the ``"inductor"`` or ``"aot_eager"`` backend there: with
    ``"eager"``, dynamo fails inside the model's ``vjp`` on the selection of the supervised
    positions (an ``AssertionError`` raised by torch).

    Raises:
        ValueError: ``update`` was built with ``fisher="mc"`` and a ``generator``, which
            dynamo cannot trace; or (at the call) a batch with causal-LM token labels under
            ``fullgraph=True``.

    Examples:
        >>> init, update = flaplace.build(model_fn, fisher="mc", lr_threshold=None)
        >>> fast = compile_update(update, backend="eager")
        >>> torch.manual_seed(0)  # mc without a generator: seed the global RNG  # doctest: +SKIP
        >>> state = fast(init(params), params, batch)  # doctest: +SKIP
    """
    if not callable(update):
        raise TypeError(f"update must be the update function of flaplace.build, got {type(update).__name__}")
    generator = _default(update, "generator")
    if isinstance(generator, torch.Generator) and _closure_value(update, "fisher") in ("mc", None):
        raise ValueError(
            "compile_update: this update was built with a torch.Generator, which torch.compile "
            "cannot trace; build it without generator= and seed with torch.manual_seed instead"
        )
    options = {"dynamic": False, "fullgraph": True, **options}
    by_tokens = _closure_value(update, "likelihood") in ("categorical", None)

    def refuse_token_labels(args: tuple, kwargs: dict[str, Any]) -> None:
        batch = args[0] if args else kwargs.get("batch")
        tokens = isinstance(batch, Mapping) and token_labels(batch) is not None
        if options["fullgraph"] and by_tokens and tokens:
            raise ValueError(
                "compile_update: fullgraph=True cannot trace an update on causal-LM token labels (the "
                "number of supervised tokens depends on the labels); pass fullgraph=False"
            )

    if backend != "inductor" or "options" in options or "mode" in options:
        whole = torch.compile(update, backend=backend, **options)

        def checked(state: KFACState, params: Any, *args: Any, **kwargs: Any) -> KFACState:
            refuse_token_labels(args, kwargs)
            return whole(state, params, *args, **kwargs)

        return checked
    compiled: list[Callable[..., KFACState]] = []

    def first_call_chooses(state: KFACState, params: Any, *args: Any, **kwargs: Any) -> KFACState:
        refuse_token_labels(args, kwargs)
        if compiled:
            return compiled[0](state, params, *args, **kwargs)
        from torch._dynamo.exc import BackendCompilerFailed  # not at import: dynamo loads slowly
        from torch._inductor.exc import CppCompileError

        cpu = _cpu_options() if all(p.device.type == "cpu" for p in params.values()) else None
        chosen: dict[str, Any] = {**options, "options": cpu} if cpu else options
        compiled.append(torch.compile(update, backend=backend, **chosen))
        try:
            return compiled[0](state, params, *args, **kwargs)
        except BackendCompilerFailed as error:
            inner: BaseException = error  # inductor's InductorError, possibly wrapped once more
            while isinstance(inner, BackendCompilerFailed):
                inner = inner.inner_exception
            built = isinstance(inner, CppCompileError | OSError)  # compiling or loading the C++
            if not (built and cpu and "cpp.vec_isa_ok" in cpu):
                raise
            warnings.warn(
                f"compile_update: compiling without inductor's instruction-set probes failed ({error}); "
                "compiling again with them",
                RuntimeWarning,
                stacklevel=2,
            )
            probed = {k: v for k, v in cpu.items() if k != "cpp.vec_isa_ok"}
            compiled[0] = torch.compile(update, backend=backend, **{**options, "options": probed})
            return compiled[0](state, params, *args, **kwargs)

    return first_call_chooses


def _cpu_options() -> dict[str, Any]:
    """Inductor options for weights on the CPU (see `compile_update`)."""
    cpu: dict[str, Any] = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
    vector = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX")
    if vector and os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") is None:
        cpu["cpp.vec_isa_ok"] = True  # PyTorch already runs this instruction set here
    return cpu


def _default(function: Callable, name: str) -> Any:
    try:
        parameter = inspect.signature(function).parameters.get(name)
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return None
    return None if parameter is None else parameter.default


def _closure_value(function: Callable, name: str) -> Any:
    try:
        return inspect.getclosurevars(inspect.unwrap(function)).nonlocals.get(name)
    except TypeError:  # not a Python function
        return None
