"""capture: the clear errors for weights it cannot capture (used twice, tied, never reached).

Moved here from tests/test_kfac.py, so that the tests mirror the modules.
"""

from __future__ import annotations

import pytest
import torch

from flaplace.capture import CaptureError
from flaplace.kfac import build
from flaplace.params import ModelFunction, select_params


def test_tied_weight_used_twice_is_an_error():
    layer = torch.nn.Linear(4, 4, bias=False).double()

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(self.layer(x))

    model = Twice()
    params = select_params(model, "weight")
    init, update = build(ModelFunction(model, params, lambda o, b: o), lr_threshold=None)
    with pytest.raises(CaptureError, match="more than once"):
        update(init(params), params, (torch.randn(2, 4, dtype=torch.float64),))


def test_tied_names_are_swapped_together_and_refused_by_kfac():
    """Two module names for one tensor: functional_call swaps both; K-FAC sees it used twice."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)).double()
    model[1].weight = model[0].weight
    params = {"0.weight": torch.randn(4, 4, dtype=torch.float64)}
    model_fn = ModelFunction(model, params, lambda o, b: o)
    assert model_fn.aliases == {"0.weight": ("1.weight",)}
    x = torch.randn(3, 4, dtype=torch.float64)
    w = params["0.weight"]
    assert torch.allclose(model_fn(params, (x,)), x @ w.T @ w.T)
    init, update = build(model_fn, lr_threshold=None)
    with pytest.raises(CaptureError, match="more than once"):
        update(init(params), params, (x,))


def test_unused_weight_is_an_error():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "idle": torch.nn.Linear(3, 2)})
    params = select_params(model, "weight")

    def model_fn(p, batch):
        return torch.func.functional_call(model["used"], {"weight": p["used.weight"]}, batch[:1])

    init, update = build(model_fn, lr_threshold=None)
    with pytest.raises(CaptureError, match="never reached"):
        update(init(params), params, (torch.randn(2, 3),))
