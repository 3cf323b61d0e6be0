"""Low-rank factors: streamed top eigenpairs against the exact factor."""

from __future__ import annotations

import optree
import torch

from flaplace.kfac import build, fit
from flaplace.kfac_state import kfac_factors
from flaplace.lowrank import empty_sketch, merge_rows, merge_sketches
from flaplace.params import ModelFunction, select_params


def _decaying_data(n: int, d: int, seed: int = 0, decay: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    scales = decay ** torch.arange(d, dtype=torch.float64)
    return torch.randn(n, d, dtype=torch.float64, generator=g) * scales @ basis.T


def _linear_problem(d: int, n_out: int = 3):
    torch.manual_seed(0)
    net = torch.nn.Linear(d, n_out, bias=False).double()
    params = select_params(net, "weight")
    return params, ModelFunction(net, params, lambda out, batch: out)


def test_merge_rows_is_exact_below_the_rank():
    rows = torch.randn(6, 40, dtype=torch.float64)
    sketch = merge_rows(empty_sketch(40, 8, dtype=torch.float64), rows)
    dense = sketch.dense()
    assert torch.allclose(dense, rows.T @ rows, atol=1e-12)


def test_low_rank_with_enough_pairs_equals_full_rank():
    params, model_fn = _linear_problem(24)
    batches = [(x,) for x in _decaying_data(60, 24).split(16)]
    options = dict(fisher="exact", progress=False)
    full, _ = fit(model_fn, params, batches, lr_threshold=None, **options)
    low, _ = fit(model_fn, params, batches, lr_threshold=20, n_kfac=24, **options)
    (name,) = params
    assert low[name].A.vectors.shape == (24, 24)
    dense_full = full[name].A.dense()
    dense_low = low[name].A.dense()
    assert torch.allclose(dense_low, dense_full, rtol=1e-10, atol=1e-12)


def test_low_rank_keeps_the_top_eigenvalues():
    params, model_fn = _linear_problem(64)
    batches = [(x,) for x in _decaying_data(400, 64, decay=0.7).split(25)]
    options = dict(fisher="exact", progress=False)
    full, _ = fit(model_fn, params, batches, lr_threshold=None, **options)
    low, _ = fit(model_fn, params, batches, lr_threshold=32, n_kfac=6, **options)
    (name,) = params
    top = full[name].A.values[:6]
    kept = low[name].A.values
    assert kept.shape == (6,)
    assert torch.allclose(kept, top, rtol=1e-4, atol=0)
    # the kept directions span the exact top eigenspace
    overlap = full[name].A.vectors[:, :6].T @ low[name].A.vectors
    assert torch.allclose(overlap.abs().diagonal(), torch.ones(6, dtype=torch.float64), atol=1e-3)


def test_no_dense_matrix_for_a_large_low_rank_factor():
    d = 4096
    params, model_fn = _linear_problem(d)
    init, update = build(model_fn, fisher="mc", lr_threshold=1024, n_kfac=10)
    state = update(init(params), params, (torch.randn(8, d, dtype=torch.float64),))
    shapes = [tuple(leaf.shape) for leaf in optree.tree_leaves(state)]
    assert all(shape.count(d) <= 1 for shape in shapes), shapes
    assert (d, 20) in shapes  # the sketch: n_kfac + oversample columns
    factors = kfac_factors(state)
    assert factors["weight"].A.vectors.shape == (d, 10)
    assert factors["weight"].S.vectors.shape == (3, 3)  # small side stays exact


def test_merge_sketches_equals_one_stream():
    rows = _decaying_data(80, 30, seed=3)
    one = merge_rows(empty_sketch(30, 30, dtype=torch.float64), rows)
    halves = [merge_rows(empty_sketch(30, 30, dtype=torch.float64), part) for part in rows.split(40)]
    both = merge_sketches(halves, 30)
    assert torch.allclose(both.values, one.values, rtol=1e-9, atol=1e-12)
