"""K-FAC against independent references: dense GGN blocks from jacrev, K-FAC's exact cases."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ANSWERS, float64_rms_norm, tiny_lora_model

from flaplace.kfac import build, fit
from flaplace.kfac_state import dense_block, kfac_factors
from flaplace.params import LastTokenLogits, ModelFunction, select_params


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _ggn_blocks(model_fn, params, batch, likelihood="categorical", sigma=1.0, transposed=()):
    """Dense GGN block of every parameter: sum_n J_n^T Lambda_n J_n with J from jacrev of the batch."""
    jac = torch.func.jacrev(lambda p: model_fn(p, batch))(params)
    logits = model_fn(params, batch).detach()
    if likelihood == "categorical":
        p = logits.softmax(-1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        eye = torch.eye(logits.shape[1], dtype=logits.dtype)
        lam = eye.expand(logits.shape[0], -1, -1) / sigma**2
    blocks = {}
    for name, j in jac.items():
        if name in transposed:  # (B, C, i, o) -> (B, C, o, i)
            j = j.transpose(-1, -2)
        j = j.reshape(j.shape[0], j.shape[1], -1)
        blocks[name] = torch.einsum("bcp,bcd,bdq->pq", j, lam, j)
    return blocks


def _assert_blocks_match(factors, blocks, tol):
    scale = max(float(b.detach().norm()) for b in blocks.values())
    for name, block in blocks.items():
        approx = dense_block(factors[name])
        if block.norm() > 1e-8 * scale:
            assert _rel(approx, block) < tol, name
        else:  # a zero block (e.g. queries with a single key): both must vanish
            assert approx.norm() < 1e-12 * scale, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_single_example_single_position_is_exact(arch):
    model = tiny_lora_model(arch)
    params = select_params(model, "lora")
    model_fn = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    batch = {"input_ids": torch.tensor([[11]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    with float64_rms_norm():
        init, update = build(model_fn, fisher="exact", lr_threshold=None)
        factors = kfac_factors(update(init(params), params, batch))
        blocks = _ggn_blocks(model_fn, params, batch)
    assert any(b.norm() > 0 for b in blocks.values())
    _assert_blocks_match(factors, blocks, 1e-10)


def test_conv1d_weight_through_addmm_is_exact():
    """A GPT-2 Conv1D weight selected directly (stored (in, out), used through addmm)."""
    model = tiny_lora_model("gpt2")
    params = select_params(model, "h.0.attn.c_attn.base_layer.weight")
    model_fn = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    assert model_fn.transposed == frozenset(params)
    batch = {"input_ids": torch.tensor([[9]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    init, update = build(model_fn, fisher="exact", lr_threshold=None)
    factors = kfac_factors(update(init(params), params, batch))
    (name,) = params
    assert bool(factors[name].transposed)
    assert factors[name].S.vectors.shape[0] == params[name].shape[1]  # o = 3 * hidden
    _assert_blocks_match(factors, _ggn_blocks(model_fn, params, batch, transposed=params), 1e-10)


class DeepLinear(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:], strict=False)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_deep_linear_gaussian_is_exact_over_uneven_batches():
    torch.manual_seed(0)
    net = DeepLinear([5, 4, 3, 2]).double()
    params = select_params(net, "weight")
    model_fn = ModelFunction(net, params, lambda out, batch: out)
    data = [torch.randn(n, 5, dtype=torch.float64) for n in (3, 5, 2)]
    batches = [(x, torch.randn(x.shape[0], 2, dtype=torch.float64)) for x in data]
    sigma = 0.7
    factors, _ = fit(
        model_fn,
        params,
        batches,
        likelihood="gaussian",
        sigma=sigma,
        fisher="exact",
        lr_threshold=None,
        progress=False,
    )
    whole = (torch.cat(data), None)
    blocks = _ggn_blocks(model_fn, params, whole, likelihood="gaussian", sigma=sigma)
    _assert_blocks_match(factors, blocks, 1e-10)


def test_mc_converges_to_exact():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    params = select_params(net, "weight")
    model_fn = ModelFunction(net, params, lambda out, batch: out)
    batches = [(torch.randn(5, 4, dtype=torch.float64),), (torch.randn(3, 4, dtype=torch.float64),)]
    exact, _ = fit(model_fn, params, batches, fisher="exact", lr_threshold=None, progress=False)
    g = torch.Generator().manual_seed(0)
    mc, _ = fit(
        model_fn,
        params,
        batches,
        fisher="mc",
        n_samples=20000,
        generator=g,
        lr_threshold=None,
        progress=False,
    )
    for name in params:
        # Monte Carlo error of a mean of 20000 rank-one terms: ~ 1/sqrt(20000) = 0.7% times
        # a spread factor of a few; 5% leaves room and still catches a wrong scale (1/k) or sign.
        assert _rel(dense_block(mc[name]), dense_block(exact[name])) < 0.05, name


def test_empirical_matches_per_example_gradients():
    """With one position per example, G_n = g_n a_n^T: recover g_n from vmap(grad) and compare."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    params = select_params(net, "weight")
    model_fn = ModelFunction(net, params, lambda out, batch: out)
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    factors, _ = fit(
        model_fn,
        params,
        [(x[:4], y[:4]), (x[4:], y[4:])],
        fisher="empirical",
        lr_threshold=None,
        progress=False,
    )

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(model_fn(p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    inputs = {"0.weight": x, "2.weight": torch.tanh(net[0](x)).detach()}
    for name, a in inputs.items():
        g = torch.einsum("noi,ni->no", grads[name], a) / (a**2).sum(1, keepdim=True)
        S = g.T @ g
        A = a.T @ a / len(a)
        assert torch.allclose(dense_block(factors[name]), torch.kron(S, A), rtol=1e-10, atol=1e-12)


def test_pooled_classifier_head_has_one_row_per_example():
    """BERT's classifier sees the pooled output, (batch, hidden): K-FAC treats it per example.

    Reference: for the head, g = columns of Lambda^{1/2} of the logits themselves, so
    S = sum_n Lambda_n and A = mean_n pooled_n pooled_n^T; the LoRA factors must not change.
    """
    from tiny_models import padded_batch

    model = tiny_lora_model("bert")
    head = "base_model.model.classifier.weight"
    lora = select_params(model, "lora")
    params = {**lora, head: dict(model.named_parameters())[head].detach()}
    batches = [padded_batch("bert", n=3, seed=1), padded_batch("bert", n=2, length=5, seed=2)]
    factors, _ = fit(
        ModelFunction(model, params), params, batches, fisher="exact", lr_threshold=None, progress=False
    )
    only_lora, _ = fit(
        ModelFunction(model, lora), lora, batches, fisher="exact", lr_threshold=None, progress=False
    )

    S = torch.zeros(3, 3, dtype=torch.float64)
    pooled = []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            p = model(**inputs).logits.softmax(-1)
            S += (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
            pooled.append(model.base_model.model.bert(**inputs).pooler_output)
    pooled = torch.cat(pooled)
    A = pooled.T @ pooled / len(pooled)
    assert _rel(dense_block(factors[head]), torch.kron(S, A)) < 1e-10
    for name in lora:
        assert _rel(dense_block(factors[name]), dense_block(only_lora[name])) < 1e-12
