"""capture(positions=...): output gradients at one position per row, equal to the full capture's there."""

from __future__ import annotations

import torch
from tiny_models import ANSWERS, padded_batch, tiny_lora_model

from flaplace.capture import capture
from flaplace.params import LastTokenLogits, ModelFunction, last_positions, select_params


def test_positions_give_the_full_gradients_at_those_positions():
    model = tiny_lora_model("llama")
    params = select_params(model, "lora")
    model_fn = ModelFunction(model, params, LastTokenLogits(ANSWERS), trim_logits=False)
    batch = padded_batch("llama", n=3, length=6)  # left padding: the last positions differ by row
    shape = tuple(batch["input_ids"].shape)
    positions = torch.tensor([5, 3, 4])
    logits, full_grads, full_inputs = capture(model_fn, params, batch, shape)
    logits_p, grads_at, inputs = capture(model_fn, params, batch, shape, positions=positions)
    assert torch.equal(logits, logits_p)
    cotangent = torch.randn_like(logits)
    full, at = full_grads(cotangent), grads_at(cotangent)
    rows = torch.arange(shape[0])
    for name in params:
        assert at[name].shape == (shape[0], 1, full[name].shape[-1])
        assert torch.allclose(at[name][:, 0], full[name][rows, positions], rtol=1e-12, atol=1e-14)
        assert torch.equal(inputs[name], full_inputs[name])  # inputs keep every position
    assert not torch.equal(at[next(iter(params))][:, 0], full[next(iter(params))][:, -1])


def test_kfac_last_reads_the_last_real_positions():
    """The positions K-FAC passes for sharing "last" are the rows' last real tokens."""
    batch = padded_batch("llama", n=3, length=6)
    expected = last_positions(batch, 6, torch.device("cpu"))
    from flaplace.kfac import _last_index

    assert torch.equal(_last_index(batch["attention_mask"].double()), expected)
