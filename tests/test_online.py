"""Online evidence tuning: with the MAP frozen it must reach the post-hoc hyperparameters; with training it runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flaplace.evidence import tune_prior_evidence
from flaplace.kfac import fit as fit_kfac
from flaplace.online import build_online_evidence, online_posterior, prior_penalty, rescale_factors
from flaplace.params import ModelFunction, select_params
from flaplace.posterior import make_posterior
from flaplace.tempered_evidence import tune_evidence_temperature

F64 = torch.float64
KFAC = {"fisher": "exact", "lr_threshold": None}


def problem(seed: int = 0, sizes=(5, 4, 6, 3), scale: float = 2.0, flip: float = 0.3):
    """A tanh MLP (5 -> 4 -> 3) and batches labelled by its own argmax with a fraction ``flip`` redrawn."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    batches = []
    for n in sizes:
        x = torch.randn(n, 5, generator=g, dtype=F64)
        y = net(x).detach().argmax(-1)
        y = torch.where(
            torch.rand(n, generator=g, dtype=F64) < flip, torch.randint(0, 3, (n,), generator=g), y
        )
        batches.append((x, y))
    params = select_params(net, "weight")
    return net, params, ModelFunction(net, params, lambda out, batch: out), batches


def post_hoc(f, params, batches, per_block=False):
    factors, state = fit_kfac(f, params, batches, progress=False, **KFAC)
    tuned, _ = tune_prior_evidence(
        make_posterior(factors, params, 1.0),
        state.log_likelihood,
        per_block=per_block,
        tol=1e-8,
        progress=False,
    )
    return factors, state, tuned


def run_frozen(f, params, batches, epochs, **options):
    init, update = build_online_evidence(f, **options, **KFAC)
    state = init(params)
    for _ in range(epochs):
        for batch in batches:
            state = update(state, params, batch)
    return state


@pytest.mark.parametrize("per_block", [False, True])
def test_frozen_map_reaches_the_post_hoc_prior(per_block):
    _, params, f, batches = problem()
    n = sum(len(b[1]) for b in batches)
    state = run_frozen(
        f, params, batches, 5, n_train=n, every=len(batches), prior_precision=1e-3, per_block=per_block
    )
    _, _, tuned = post_hoc(f, params, batches, per_block)
    assert int(state.refreshes) == 5 and int(state.step) == 5 * len(batches)
    for name in params:
        got, want = float(state.prior_precision[name]), float(tuned.prior_precision[name])
        assert got == pytest.approx(want, rel=1e-3), name
    if per_block:  # the blocks really got their own values
        values = [float(v) for v in state.prior_precision.values()]
        assert abs(math.log(values[0] / values[1])) > 0.1


def test_a_window_is_rescaled_to_the_whole_training_set():
    """Two copies of the data; the window holds one copy, so S and LL times N / n = 2 are the whole set's."""
    _, params, f, batches = problem()
    data = batches + batches
    n = sum(len(b[1]) for b in data)
    state = run_frozen(f, params, data, 3, n_train=n, every=len(batches), prior_precision=1e3)
    factors, kfac_state, tuned = post_hoc(f, params, data)
    assert float(state.log_likelihood) == pytest.approx(float(kfac_state.log_likelihood), rel=1e-12)
    for name in params:
        assert torch.allclose(state.factors[name].S.dense(), factors[name].S.dense(), rtol=1e-10, atol=1e-12)
        assert torch.allclose(state.factors[name].A.dense(), factors[name].A.dense(), rtol=1e-10, atol=1e-12)
        assert float(state.prior_precision[name]) == pytest.approx(
            float(tuned.prior_precision[name]), rel=1e-3
        )
    posterior = online_posterior(state, params)
    assert posterior.prior_precision == state.prior_precision


def test_frozen_map_reaches_the_post_hoc_temperature():
    _, params, f, batches = problem(scale=6.0, flip=0.1, sizes=(16, 16, 16, 16))
    n = sum(len(b[1]) for b in batches)
    state = run_frozen(f, params, batches, 10, n_train=n, every=len(batches), tune_temperature=True)
    best, _ = tune_evidence_temperature(f, params, batches, refine_steps=10, progress=False, **KFAC)
    assert abs(math.log(best.temperature)) > 0.2  # the evidence prefers T != 1 here
    assert abs(math.log(float(state.temperature)) - math.log(best.temperature)) < 0.03
    lam = float(state.prior_precision["0.weight"])
    assert lam == pytest.approx(float(best.posterior.prior_precision["0.weight"]), rel=0.1)


def test_training_under_the_online_prior_moves_it_towards_the_evidence():
    net, params, f, batches = problem(sizes=(8, 8, 8, 8))
    n = sum(len(b[1]) for b in batches)
    names = list(params)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    start = 1e3
    init, update = build_online_evidence(
        f, n_train=n, every=8, prior_precision=start, evidence_steps=20, **KFAC
    )
    state = init(theta)
    optimizer = torch.optim.SGD(list(theta.values()), lr=0.05)
    precisions = []
    for _ in range(12):
        for batch in batches:
            logits = functional_call(net, theta, (batch[0],))
            loss = F.cross_entropy(logits, batch[1]) + prior_penalty(theta, state.prior_precision, n)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state = update(state, theta, batch)
        precisions.append(float(state.prior_precision[names[0]]))
    final = {k: v.detach() for k, v in theta.items()}
    _, _, tuned = post_hoc(f, final, batches)
    target = float(tuned.prior_precision[names[0]])
    assert int(state.refreshes) == 12 * len(batches) // 8
    assert abs(math.log(precisions[-1] / target)) < 0.5 * abs(math.log(start / target))
    assert precisions[-1] < start / 10  # the too-strong starting prior was relaxed
    posterior = online_posterior(update(state, final, refresh=True), final)
    assert set(posterior.mean) == set(names)


def test_prior_penalty_per_block_and_centred():
    g = torch.Generator().manual_seed(0)
    params = {"a.lora_A": torch.randn(2, 3, generator=g), "a.lora_B": torch.randn(3, 2, generator=g)}
    centre = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    got = prior_penalty(params, {"lora_A": 2.0, "lora_B": 5.0}, 10, centre)
    want = (
        2.0 * (params["a.lora_A"] - centre["a.lora_A"]).square().sum()
        + 5.0 * (params["a.lora_B"] - centre["a.lora_B"]).square().sum()
    ) / 20
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    lam = torch.tensor(3.0, requires_grad=True)
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    prior_penalty(theta, lam, 4).backward()
    assert lam.grad is None  # the prior precision is a constant of the training loss
    assert torch.allclose(theta["a.lora_A"].grad, 3.0 / 4 * params["a.lora_A"])
    with pytest.raises(ValueError, match="n_train"):
        prior_penalty(params, 1.0, 0)


def test_micro_batches_count_as_one_step_and_errors_are_clear():
    _, params, f, batches = problem()
    init, update = build_online_evidence(f, n_train=18, every=2, window=1, **KFAC)
    state = init(params)
    with pytest.raises(ValueError, match="nothing to refresh"):
        update(state, params, refresh=True)
    with pytest.raises(ValueError, match="no factors yet"):
        online_posterior(state, params)
    state = update(state, params, batches[0], batches[1])
    assert int(state.step) == 1 and len(state.window) == 1 and len(state.window[0]) == 2
    state = update(state, params, batches[2], batches[3])
    assert int(state.refreshes) == 1 and state.window[0] == (batches[2], batches[3])
    with pytest.raises(ValueError, match="every >= 1"):
        build_online_evidence(f, n_train=18, every=0)


def test_rescale_factors_scales_s_only():
    _, params, f, batches = problem()
    factors, _ = fit_kfac(f, params, batches, progress=False, **KFAC)
    scaled = rescale_factors(factors, 3.0)
    for name in params:
        assert torch.allclose(scaled[name].S.dense(), 3.0 * factors[name].S.dense())
        assert torch.equal(scaled[name].A.values, factors[name].A.values)
