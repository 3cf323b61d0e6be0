"""K-FAC API: distributed sums, compilation, clear errors, and no hooks in the library."""

from __future__ import annotations

import json
import pathlib
import re

import optree
import pytest
import torch
import torch.multiprocessing as mp
from conftest import run_without_typechecks
from dist_worker import OPTIONS, _dense, _mlp_problem, _worker
from tiny_models import tiny_lora_model

from flaplace.kfac import build, fit
from flaplace.kfac_state import input_factor_keys, kfac_factors
from flaplace.params import ModelFunction, select_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_two_processes_give_the_single_process_factors(tmp_path):
    out = tmp_path / "factors.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    together = torch.load(out, weights_only=False)
    params, model_fn, data = _mlp_problem()
    alone, _ = fit(model_fn, params, data, **OPTIONS)
    for name in params:
        for side in ("S", "A"):
            a, b = getattr(alone[name], side), getattr(together[name], side)
            assert torch.allclose(_dense(b), _dense(a), rtol=1e-8, atol=1e-12), (name, side)


COMPILE_CHECK = """
import json, torch
from tiny_models import ANSWERS, padded_batch, tiny_lora_model
from flaplace.kfac import build
from flaplace.params import LastTokenLogits, ModelFunction, select_params
model = tiny_lora_model("llama", dtype=torch.float32)
params = select_params(model, "lora")
init, update = build(ModelFunction(model, params, LastTokenLogits(ANSWERS)), fisher="exact",
                     sharing=SHARING, lr_threshold=None)
batch = padded_batch("llama")
explanation = torch._dynamo.explain(update)(init(params), params, batch)
compiled = torch.compile(update, backend="aot_eager")(init(params), params, batch)
eager = update(init(params), params, batch)
err = max(float((getattr(compiled, side)[n] - getattr(eager, side)[n]).norm()
                / getattr(eager, side)[n].norm()) for n in params for side in ("S", "A"))
print(json.dumps({"breaks": explanation.graph_break_count, "graphs": explanation.graph_count, "err": err}))
"""


@pytest.mark.parametrize("sharing", ["reduce", "last"])  # "last" places its probes with index_put
def test_update_compiles_without_graph_breaks(sharing):
    script = COMPILE_CHECK.replace("SHARING", repr(sharing))
    result = json.loads(run_without_typechecks(script).strip().splitlines()[-1])
    assert result["breaks"] == 0
    assert result["graphs"] == 1
    assert result["err"] < 1e-4


@pytest.mark.parametrize("lr_threshold", [None, 8])
def test_layers_fed_the_same_input_share_one_input_factor(lr_threshold):
    """q_proj and v_proj see the same hidden states: one A object, equal to the unshared result."""
    from tiny_models import ANSWERS, padded_batch

    from flaplace.params import LastTokenLogits

    model = tiny_lora_model("llama")
    params = select_params(model, "lora")
    init, update = build(
        ModelFunction(model, params, LastTokenLogits(ANSWERS)),
        fisher="exact",
        lr_threshold=lr_threshold,
        n_kfac=4,
    )
    batch = padded_batch("llama")
    state = update(update(init(params, batch), params, batch), params, batch)
    q, v = (next(n for n in params if f"layers.1.self_attn.{p}.lora_A" in n) for p in ("q_proj", "v_proj"))
    keys = input_factor_keys(state)
    assert keys[q] == keys[v] and q in keys[q].split("|") and v in keys[q].split("|")
    assert keys[q] != keys[next(n for n in params if "layers.0.self_attn.q_proj.lora_A" in n)]
    assert len(state.A) < len(params)  # stored once per group
    # Without an example batch every layer has its own input factor, with the same values.
    unshared = update(update(init(params), params, batch), params, batch)
    assert set(unshared.A) == set(params)
    for name in params:
        pairs = zip(
            optree.tree_leaves(state.A[keys[name]]), optree.tree_leaves(unshared.A[name]), strict=True
        )
        for got, want in pairs:
            assert torch.allclose(got, want, rtol=1e-12, atol=0), name
    factors = kfac_factors(state)
    assert factors[q].A is factors[v].A
    # The sharing is structure: a tree_map (e.g. a copy or a device move) keeps it.
    copied = torch.utils._pytree.tree_map(torch.clone, state)
    assert set(copied.A) == set(state.A)
    again = kfac_factors(update(copied, params, batch))
    assert again[q].A is again[v].A


def test_no_hooks_in_the_library():
    pattern = re.compile(r"register_(forward_pre|forward|full_backward|backward)_hook|\.register_hook\(")
    offenders = [p for p in (ROOT / "flaplace").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_selection_errors():
    model = tiny_lora_model("llama")
    with pytest.raises(ValueError, match="matches no parameter"):
        select_params(model, "no_such_module")
    with pytest.raises(ValueError, match="no parameter"):
        select_params(model, lambda name, p: False)
    with pytest.raises(ValueError, match="not parameters"):
        ModelFunction(model, ["made.up.name"])


def test_bad_options_and_empty_data():
    params, model_fn, data = _mlp_problem()
    with pytest.raises((ValueError, TypeError), match="(?i)fisher"):
        build(model_fn, fisher="hessian")
    with pytest.raises((ValueError, TypeError), match="sharing"):
        build(model_fn, sharing="average")
    with pytest.raises(ValueError, match="empty"):
        fit(model_fn, params, [], progress=False)
    init, _ = build(model_fn)
    with pytest.raises(ValueError, match="no data"):
        kfac_factors(init(params))
    with pytest.raises(ValueError, match="empirical Fisher needs"):
        fit(model_fn, params, data, fisher="empirical", progress=False)


def test_label_outside_classes_is_an_error():
    params, model_fn, data = _mlp_problem()
    x = data[0][0]
    with pytest.raises(ValueError, match="outside the classes"):
        fit(model_fn, params, [(x, torch.full((len(x),), 7))], fisher="empirical", progress=False)


def test_mc_is_reproducible_with_a_generator():
    params, model_fn, data = _mlp_problem()
    runs = [
        fit(
            model_fn, params, data, fisher="mc", generator=torch.Generator().manual_seed(5), progress=False
        ).factors
        for _ in range(2)
    ]
    for name in params:
        assert torch.equal(runs[0][name].S.values, runs[1][name].S.values)
