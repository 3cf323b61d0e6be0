"""compile_update and the compiled K-FAC update: one compilation per batch shape, none for new data.

The compile checks run in a subprocess without the type-checking hook (its jaxtyping wrappers
cannot be traced), on the library exactly as users import it. ``CompileCounter`` counts the
graphs dynamo hands to the backend: a recompilation is one more.
"""

from __future__ import annotations

import doctest
import importlib
import json

import pytest
import torch
from conftest import run_without_typechecks
from test_docs import tiny_namespace
from tiny_models import ANSWERS, tiny_lora_model

import flaplace
from flaplace.compiling import compile_update
from flaplace.kfac import build
from flaplace.params import LastTokenLogits, ModelFunction, select_params

NEW_DATA_AND_SHAPES = """
import json, torch
from torch._dynamo.testing import CompileCounter
from tiny_models import ANSWERS, padded_batch, tiny_base_model, tiny_lora_model
from flaplace import CaptureError, build, compile_update
from flaplace.params import LastTokenLogits, ModelFunction, select_params
model = tiny_lora_model("llama", dtype=torch.float32)
params = select_params(model, "lora")
init, update = build(ModelFunction(model, params, LastTokenLogits(ANSWERS)), fisher="exact",
                     lr_threshold=None)
first = padded_batch("llama", seed=1)
state = init(params, first)

def rel_err(a, b):
    return max(float((getattr(a, s)[k] - getattr(b, s)[k]).norm() / getattr(b, s)[k].norm())
               for s in ("S", "A") for k in getattr(b, s))

out = {}
# new data (the state carried over), then a new shape, then the first shape again
counter = CompileCounter()
fast = compile_update(update, backend=counter)
graphs, errs, got, want = [], [], state, state
for n, length, seed in [(3, 6, 1), (3, 6, 3), (3, 9, 5), (3, 6, 6)]:
    batch = padded_batch("llama", n=n, length=length, seed=seed)
    got, want = fast(got, params, batch), update(want, params, batch)
    errs.append(rel_err(got, want))
    graphs.append(counter.frame_count)
out["compile_update"] = {"graphs": graphs, "err": max(errs)}
# the tied-weight check still runs under compilation
gpt2 = tiny_base_model("gpt2").eval()
tied = select_params(gpt2, "wte")
init2, update2 = build(ModelFunction(gpt2, tied, LastTokenLogits(ANSWERS)), fisher="exact",
                       lr_threshold=None)
try:
    compile_update(update2, backend="eager")(init2(tied), tied, padded_batch("gpt2"))
    out["tied"] = "no error"
except Exception as error:
    out["tied"] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


def test_compiled_update_does_not_recompile_for_new_data_and_compiles_once_per_shape():
    """Second call with new data of the same shape: no recompilation (it used to recompile on
    every batch: ``id()`` of a batch tensor in the capture was a guard on that object)."""
    result = json.loads(run_without_typechecks(NEW_DATA_AND_SHAPES, timeout=1200).strip().splitlines()[-1])
    # dynamic=False: (3, 6) once, new data free, a new length (3, 9) once more, (3, 6) again free
    assert result["compile_update"]["graphs"] == [1, 1, 2, 2], result
    assert result["compile_update"]["err"] < 1e-5, result
    assert "CaptureError" in result["tied"] and "embedding" in result["tied"], result


INDUCTOR_ON_CPU = """
import json, torch
from torch._dynamo.utils import counters
from tiny_models import ANSWERS, padded_batch, tiny_lora_model
from flaplace import build, compile_update
from flaplace.params import LastTokenLogits, ModelFunction, select_params
model = tiny_lora_model("llama", dtype=torch.float32)
params = select_params(model, "lora")
init, update = build(ModelFunction(model, params, LastTokenLogits(ANSWERS)), fisher="exact",
                     lr_threshold=None)
fast = compile_update(update)  # inductor, with the CPU options chosen on the first call
got = want = init(params)
graphs, errs = [], []
for seed in (1, 2):
    batch = padded_batch("llama", n=3, length=6, seed=seed)
    got, want = fast(got, params, batch), update(want, params, batch)
    graphs.append(counters["stats"]["unique_graphs"])
    errs.append(max(float((got.S[k] - want.S[k]).norm() / want.S[k].norm()) for k in want.S))
print(json.dumps({"graphs": graphs, "err": max(errs)}))
"""


@pytest.mark.slow
def test_compile_update_with_inductor_on_the_cpu_compiles_once_and_agrees_with_eager(tmp_path):
    """The real CPU options (``cpp_wrapper``, two C++ files, no instruction-set probes) build and
    run: one graph for two batches of new data, factors equal to the eager update's."""
    script = f"import os; os.environ['TORCHINDUCTOR_CACHE_DIR'] = {str(tmp_path)!r}\n" + INDUCTOR_ON_CPU
    result = json.loads(run_without_typechecks(script, timeout=1200).strip().splitlines()[-1])
    assert result["graphs"] == [1, 1], result
    assert result["err"] < 1e-5, result


def test_compile_update_refuses_a_generator_for_mc():
    model = tiny_lora_model("llama", dtype=torch.float32)
    params = select_params(model, "lora")
    model_fn = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    _, update = build(model_fn, fisher="mc", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="torch.Generator.*torch.manual_seed"):
        compile_update(update)
    _, exact = build(model_fn, fisher="exact", generator=torch.Generator())  # never draws: fine
    assert callable(compile_update(exact, backend="eager"))


def test_compile_update_is_exported_and_its_examples_run():
    assert flaplace.compile_update is compile_update
    module = importlib.import_module("flaplace.compiling")
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    outcome = doctest.testmod(module, extraglobs={"torch": torch, **tiny_namespace()}, optionflags=flags)
    assert outcome.attempted > 0 and outcome.failed == 0


CPU_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True, "cpp.vec_isa_ok": True}


def _lora_state():
    model = tiny_lora_model("llama", dtype=torch.float32)
    params = select_params(model, "lora")
    init, _ = build(ModelFunction(model, params, LastTokenLogits(ANSWERS)), fisher="exact", lr_threshold=None)
    return init(params), params


def _fake_compile(calls: list, runs: list, fails_with: Exception | None = None):
    """A stand-in for torch.compile that records its keyword arguments; ``fails_with`` is raised
    by the first call of a function compiled with ``cpp.vec_isa_ok``."""

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)

        def run(*args, **kw):
            runs.append(len(calls))
            if fails_with is not None and "cpp.vec_isa_ok" in kwargs.get("options", {}):
                raise fails_with
            return fn(*args, **kw)

        return run

    return fake_compile


def test_compile_update_chooses_cpu_options_on_the_first_call(monkeypatch):
    """Inductor on CPU weights: ``cpp_wrapper`` built as two files and, where PyTorch runs a vector
    instruction set, no start-up probes; chosen on the first call. Other devices, other backends,
    or the caller's own ``options``/``mode`` are left alone."""
    calls, runs = [], []
    state, params = _lora_state()
    update = lambda state, params, batch: state  # noqa: E731
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch, "compile", _fake_compile(calls, runs))
    fast = compile_update(update)
    assert calls == []  # nothing compiled before the first call: the device is not known yet
    assert fast(state, params, None) is state and fast(state, params, None) is state
    assert runs == [1, 1]  # compiled once, run twice
    assert calls == [{"backend": "inductor", "dynamic": False, "fullgraph": True, "options": CPU_OPTIONS}]
    calls.clear()
    compile_update(update, backend="aot_eager")
    compile_update(update, options={"max_autotune": True})
    compile_update(update, mode="max-autotune-no-cudagraphs")
    assert [c.get("options") for c in calls] == [None, {"max_autotune": True}, None]
    on_meta = {n: p.to("meta") for n, p in params.items()}  # a device other than the CPU
    assert compile_update(update)(state, on_meta, None) is state
    assert "options" not in calls[-1]
    # the probes stay where PyTorch runs no vector instruction set, or where the user decides
    probed = {k: v for k, v in CPU_OPTIONS.items() if k != "cpp.vec_isa_ok"}
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    compile_update(update)(state, params, None)
    assert calls[-1]["options"] == probed
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    compile_update(update)(state, params, None)
    assert calls[-1]["options"] == probed


def test_compile_update_compiles_again_with_the_probes_if_the_cpp_build_fails(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError

    state, params = _lora_state()
    update = lambda state, params, batch: state  # noqa: E731
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    from torch._inductor.exc import InductorError

    # as inductor raises it (InductorError(CppCompileError)), wrapped once more by dynamo
    failed = BackendCompilerFailed(
        update, InductorError(CppCompileError(["g++"], "no AVX-512 here"), None), None
    )
    calls, runs = [], []
    monkeypatch.setattr(torch, "compile", _fake_compile(calls, runs, failed))
    fast = compile_update(update)
    with pytest.warns(RuntimeWarning, match="compiling again with them"):
        assert fast(state, params, None) is state
    assert fast(state, params, None) is state
    assert [c["options"] for c in calls] == [
        CPU_OPTIONS,
        {"cpp_wrapper": True, "cpp_wrapper_build_separate": True},
    ]
    assert runs == [1, 2, 2]  # the failed first try, then the probed compilation twice
    # any other failure is the caller's to see, not retried
    other = BackendCompilerFailed(update, ValueError("a lowering bug"), None)
    monkeypatch.setattr(torch, "compile", _fake_compile(calls, runs, other))
    with pytest.raises(BackendCompilerFailed, match="a lowering bug"):
        compile_update(update)(state, params, None)
