"""A likelihood temperature in the evidence and on validation NLL, against closed forms and dense grids."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flaplace.evidence import tune_prior_evidence
from flaplace.kfac import fit as fit_kfac
from flaplace.links import predictive_probs
from flaplace.metrics import nll
from flaplace.params import ModelFunction, select_params
from flaplace.posterior import make_posterior, with_prior_precision
from flaplace.predictive import linearised_predictive
from flaplace.temperature import (
    TEMPERATURE_LIMITS,
    TemperedModelFunction,
    fit_temperature,
    maximise_on_log_grid,
    tempered_moments,
)
from flaplace.tempered_evidence import (
    MappedBatches,
    evidence_at_temperature,
    soften_by_evidence,
    tune_evidence_temperature,
)
from flaplace.tempered_validation import (
    MAP_LIMIT,
    ScalingMixture,
    akaike_weight,
    mix_with_scaling,
    scaling_mixture,
    tune_prior_temperature_grid,
    tune_prior_temperature_nll,
    validation_nll_tempered,
)
from flaplace.validation import validation_features, validation_nll

F64 = torch.float64


def linear_problem(scale: float = 3.0, n_batches: int = 3, seed: int = 0):
    """``f = W x`` (3 classes, 4 features), labels from ``W`` with 15 % flipped: an overconfident MAP."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(4, 3, bias=False, dtype=F64)
    with torch.no_grad():
        net.weight.copy_(scale * torch.randn(3, 4, generator=g, dtype=F64))
    batches = []
    for _ in range(n_batches):
        x = torch.randn(6, 4, generator=g, dtype=F64)
        y = net(x).detach().argmax(-1)
        flip = torch.rand(6, generator=g, dtype=F64) < 0.15
        y = torch.where(flip, torch.randint(0, 3, (6,), generator=g), y)
        batches.append((x, y))
    params = select_params(net, "weight")
    return net, params, ModelFunction(net, params, lambda out, batch: out), batches


def mlp_problem(seed: int = 0, n_batches: int = 4, scale: float = 2.0, flip: float = 0.35):
    """A tanh MLP (5 -> 4 -> 3); labels are its own argmax with a fraction ``flip`` redrawn at random."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(8, 5, generator=g, dtype=F64)
        y = net(x).detach().argmax(-1)
        y = torch.where(
            torch.rand(8, generator=g, dtype=F64) < flip, torch.randint(0, 3, (8,), generator=g), y
        )
        batches.append((x, y))
    params = select_params(net, "weight")
    return net, params, ModelFunction(net, params, lambda out, batch: out), batches


def test_wrapper_divides_logits_and_reads_attributes_through():
    _, params, f, batches = mlp_problem()
    hot = TemperedModelFunction(f, 2.5)
    assert torch.equal(hot(params, batches[0]), f(params, batches[0]) / 2.5)
    assert torch.equal(TemperedModelFunction(f, 1.0)(params, batches[0]), f(params, batches[0]))
    assert hot.transposed == f.transposed and hot.names == f.names
    with pytest.raises(ValueError, match="positive and finite"):
        TemperedModelFunction(f, 0.0)


def test_temperature_one_reproduces_the_untempered_evidence_exactly():
    _, params, f, batches = mlp_problem()
    factors, state = fit_kfac(f, params, batches, fisher="exact", progress=False)
    tuned, history = tune_prior_evidence(
        make_posterior(factors, params, 1.0), state.log_likelihood, progress=False
    )
    result = evidence_at_temperature(f, params, batches, 1.0, fisher="exact")
    assert torch.equal(result.log_likelihood, state.log_likelihood)
    assert result.log_evidence == history[-1]["log_evidence"]
    for name in params:
        assert torch.equal(result.posterior.prior_precision[name], tuned.prior_precision[name])
        assert torch.equal(result.posterior.factors[name].S.values, factors[name].S.values)


def closed_form_factors(net, batches, temperature):
    """For ``f = W x`` with one position per example: ``S = sum_n Lambda(f_n / T) / T^2``, ``A = mean x x^T``."""
    s = torch.zeros(3, 3, dtype=F64)
    a = torch.zeros(4, 4, dtype=F64)
    ll = torch.zeros((), dtype=F64)
    n = 0
    for x, y in batches:
        f = net(x).detach() / temperature
        p = f.softmax(-1)
        s += (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0) / temperature**2
        a += x.T @ x
        ll += -F.cross_entropy(f, y, reduction="sum")
        n += x.shape[0]
    return s, a / n, ll


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_tempered_factors_match_the_closed_form(fisher):
    net, params, f, batches = linear_problem()
    temperature = 2.0
    options = {"n_samples": 4000, "generator": torch.Generator().manual_seed(0)} if fisher == "mc" else {}
    factors, state = fit_kfac(
        TemperedModelFunction(f, temperature), params, batches, fisher=fisher, progress=False, **options
    )
    s, a, ll = closed_form_factors(net, batches, temperature)
    rtol = 1e-10 if fisher == "exact" else 0.1
    assert torch.allclose(factors["weight"].S.dense(), s, rtol=rtol, atol=rtol * float(s.abs().max()))
    assert torch.allclose(factors["weight"].A.dense(), a, rtol=1e-10)
    assert float(state.log_likelihood) == pytest.approx(float(ll), rel=1e-12)


def profile_evidence_dense(net, batches, params, temperature):
    """``max_lambda log Z(lambda, T)`` on a fine grid of ``log lambda``, from the dense closed-form precision.

    ``log Z = LL_T - (lambda/2) ||theta||^2 - 1/2 (logdet(H + lambda I) - logdet(lambda I))`` with
    ``H = S_T (x) A`` materialised (12 x 12) and its eigenvalues taken once for the whole grid.
    """
    s, a, ll = closed_form_factors(net, batches, temperature)
    eigenvalues = torch.linalg.eigvalsh(torch.kron(s, a)).clamp(min=0)
    lam = torch.linspace(-8, 8, 4001, dtype=F64).exp()
    squared = params["weight"].detach().square().sum()
    log_z = ll - lam / 2 * squared - 0.5 * torch.log1p(eigenvalues[None, :] / lam[:, None]).sum(1)
    return float(log_z.max())


def test_joint_evidence_optimum_matches_a_dense_grid():
    net, params, f, batches = linear_problem()
    best, table = tune_evidence_temperature(
        f,
        params,
        batches,
        temperatures=[2.0 ** (k / 2) for k in range(-2, 11)],
        fisher="exact",
        refine_steps=14,
        progress=False,
        tune_options={"tol": 1e-8},
    )
    temperatures = torch.linspace(0.0, math.log(32.0), 161, dtype=F64).exp().tolist()
    profile = [profile_evidence_dense(net, batches, params, t) for t in temperatures]
    k = max(range(len(profile)), key=profile.__getitem__)
    assert 0 < k < len(profile) - 1, "the optimum must be inside the grid for this test to mean anything"
    spacing = math.log(temperatures[1]) - math.log(temperatures[0])
    assert abs(math.log(best.temperature) - math.log(temperatures[k])) < spacing
    assert best.log_evidence == pytest.approx(profile[k], abs=1e-3)
    assert best.log_evidence >= max(r["log_evidence"] for r in table if r["temperature"] == 1.0)
    assert best.temperature > 1.05  # an overconfident W: the evidence prefers a hotter likelihood


def test_validation_nll_at_temperature_one_is_the_untempered_one():
    _, params, f, batches = mlp_problem()
    factors, _ = fit_kfac(f, params, batches, fisher="exact", progress=False)
    posterior = make_posterior(factors, params, 0.5)
    features = validation_features(posterior, f, batches)
    assert torch.equal(validation_nll_tempered(posterior, features, 1.0), validation_nll(posterior, features))
    informed = validation_nll_tempered(posterior, features, 1.0, directions="informed")
    assert torch.equal(informed, validation_nll(posterior, features, directions="informed"))
    assert not torch.equal(informed, validation_nll(posterior, features))  # the choice matters here


def dense_validation_grid(f, posterior, batches, log_lams, log_ts):
    """Mean NLL on a grid, through the public path: linearised_predictive, tempered, probit, metrics.nll."""
    labels = torch.cat([b[1] for b in batches])
    grid = {}
    for a in log_lams:
        post = with_prior_precision(posterior, math.exp(a))
        f_mu, f_var = (
            torch.cat(parts)
            for parts in zip(*(linearised_predictive(f, post, b) for b in batches), strict=True)
        )
        for b in log_ts:
            probs = predictive_probs(*tempered_moments(f_mu, f_var, math.exp(b)), link="probit")
            grid[(a, b)] = float(nll(probs, labels))
    return grid


def test_joint_validation_optimum_matches_a_dense_grid():
    _, params, f, batches = mlp_problem()
    train, val = batches[:2], batches[2:]
    factors, _ = fit_kfac(f, params, train, fisher="exact", progress=False)
    posterior = make_posterior(factors, params, 1.0)
    tuned, temperature, _ = tune_prior_temperature_nll(
        posterior, f, val, lr=0.1, tol=1e-7, patience=50, progress=False
    )
    lam = float(tuned.prior_precision["0.weight"])
    log_lams = torch.linspace(-2, 6, 17, dtype=F64).tolist()
    log_ts = torch.linspace(-1.5, 1.5, 31, dtype=F64).tolist()
    grid = dense_validation_grid(f, posterior, val, log_lams, log_ts)
    (best_a, best_b), best_nll = min(grid.items(), key=lambda kv: kv[1])
    assert best_a not in (log_lams[0], log_lams[-1]) and best_b not in (log_ts[0], log_ts[-1])
    assert abs(best_b) > 0.15  # the best temperature is not 1: the joint fit has something to find
    got = dense_validation_grid(f, posterior, val, [math.log(lam)], [math.log(temperature)])
    assert next(iter(got.values())) <= best_nll + 1e-9  # at least as good as the grid's best
    assert abs(math.log(lam) - best_a) < 2 * (log_lams[1] - log_lams[0])
    assert abs(math.log(temperature) - best_b) < 2 * (log_ts[1] - log_ts[0])


def test_grid_search_of_prior_and_temperature_matches_a_dense_grid_and_includes_temperature_scaling():
    _, params, f, batches = mlp_problem()
    train, val = batches[:2], batches[2:]
    factors, _ = fit_kfac(f, params, train, fisher="exact", progress=False)
    posterior = make_posterior(factors, params, 1.0)
    features = validation_features(posterior, f, val)
    log_lams = torch.linspace(-2, 6, 17, dtype=F64).tolist()
    tuned, temperature, table = tune_prior_temperature_grid(
        posterior,
        lambda p: lambda t: validation_nll_tempered(p, features, t),
        [math.exp(a) for a in log_lams],
        progress=False,
    )
    lam = float(tuned.prior_precision["0.weight"])
    assert len(table) == len(log_lams) + 1 and table[-1]["prior_precision"] == MAP_LIMIT
    # per lambda, the temperature found is the minimum of a dense temperature grid
    log_ts = torch.linspace(-1.5, 1.5, 301, dtype=F64).tolist()
    dense = dense_validation_grid(f, posterior, val, [math.log(lam)], log_ts)
    (_, best_b), best_nll = min(dense.items(), key=lambda kv: kv[1])
    assert abs(math.log(temperature) - best_b) < 2 * (log_ts[1] - log_ts[0])
    chosen = dense_validation_grid(f, posterior, val, [math.log(lam)], [math.log(temperature)])
    assert next(iter(chosen.values())) <= best_nll + 1e-9
    # never worse than temperature scaling of the MAP (the lambda -> infinity candidate)
    logits = torch.cat([f(params, b).detach() for b in val])
    labels = torch.cat([b[1] for b in val])
    scaled = float(F.cross_entropy(logits / fit_temperature(logits, labels), labels))
    assert min(row["nll"] for row in table) <= scaled + 1e-6
    assert table[-1]["nll"] == pytest.approx(scaled, abs=1e-6)
    with pytest.raises(ValueError, match="positive, finite"):
        tune_prior_temperature_grid(posterior, lambda p: lambda t: 0.0, [-1.0], progress=False)


def test_grid_search_follows_temperature_scaling_past_the_end_of_its_grid():
    # logits 200 times too large and labels half noise (as a summed cloze score of a MAP that
    # knows little): temperature scaling needs T in the hundreds, far past the grid's 16
    _, params, f, batches = mlp_problem(scale=2.0, flip=0.6)
    scaled_f = lambda p, b: 200.0 * f(p, b)  # noqa: E731
    train, val = batches[:2], batches[2:]
    factors, _ = fit_kfac(scaled_f, params, train, fisher="exact", progress=False)
    posterior = make_posterior(factors, params, 1.0)
    features = validation_features(posterior, scaled_f, val)
    logits = torch.cat([scaled_f(params, b).detach() for b in val])
    labels = torch.cat([b[1] for b in val])
    t_scaling = fit_temperature(logits, labels)
    assert t_scaling > 64.0
    nll_at = lambda p: lambda t: validation_nll_tempered(p, features, t)  # noqa: E731
    _, _, table = tune_prior_temperature_grid(posterior, nll_at, [1.0], progress=False)
    assert table[-1]["temperature"] == pytest.approx(t_scaling, rel=0.02)
    assert table[-1]["nll"] == pytest.approx(float(F.cross_entropy(logits / t_scaling, labels)), abs=1e-6)
    capped = tune_prior_temperature_grid(posterior, nll_at, [1.0], limits=(0.25, 16.0), progress=False)[2]
    assert capped[-1]["temperature"] <= 16.0 and capped[-1]["nll"] > table[-1]["nll"] + 1e-3
    # extending stops at the limits, and a grid whose best point is inside is searched as before
    calls: list[float] = []

    def rising(x: float) -> float:
        calls.append(x)
        return math.log(x)

    assert maximise_on_log_grid(rising, [1.0, 2.0, 4.0], 0, (0.5, 40.0)) == 32.0 and calls[-1] == 32.0


def test_akaike_weights_and_the_mixture_with_temperature_scaling():
    # exp(-AIC / 2) = exp(LL - k) normalised over two models, written out
    for gain, k in ((0.0, 1), (1.0, 1), (3.7, 1), (-2.0, 1), (0.5, 0), (4.0, 3)):
        richer, simpler = math.exp(gain - k), math.exp(0.0)
        assert akaike_weight(gain, k) == pytest.approx(richer / (richer + simpler), rel=1e-12)
    assert akaike_weight(1e4) == 1.0 and akaike_weight(-1e4) == 0.0  # no overflow either way
    for bad in ((math.nan, 1), (math.inf, 1), (0.0, -1)):
        with pytest.raises(ValueError, match="finite gain"):
            akaike_weight(*bad)
    # the grid's table: the winner's summed gain over temperature scaling, at the price of lambda
    table = [
        {"prior_precision": 0.1, "temperature": 0.5, "nll": 0.60},
        {"prior_precision": 3.0, "temperature": 2.0, "nll": 0.48},
        {"prior_precision": MAP_LIMIT, "temperature": 1.7, "nll": 0.50},
    ]
    mixture = scaling_mixture(table, 40)
    assert mixture.temperature == 1.7
    assert mixture.weight == pytest.approx(1 / (1 + math.exp(1 - 40 * 0.02)), rel=1e-12)
    table[-1]["nll"] = 0.40  # temperature scaling wins: it is the whole predictive
    assert scaling_mixture(table, 40) == ScalingMixture(0.0, 1.7)
    with pytest.raises(ValueError, match="temperature-scaling row"):
        scaling_mixture(table[:2], 40)
    with pytest.raises(ValueError, match="at least one"):
        scaling_mixture(table, 0)


def test_mixing_with_temperature_scaling_for_both_likelihoods():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], dtype=torch.float64)
    logits = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -3.0]], dtype=torch.float64)
    mixed = mix_with_scaling(probs, logits, ScalingMixture(0.25, 2.0))
    for row in range(2):
        e = [math.exp(v / 2.0) for v in logits[row].tolist()]
        expected = [0.25 * p + 0.75 * v / sum(e) for p, v in zip(probs[row].tolist(), e, strict=True)]
        assert mixed[row].tolist() == pytest.approx(expected, rel=1e-12)
    # bernoulli: one logit f, probabilities [1 - sigmoid(f / T), sigmoid(f / T)]
    two = torch.tensor([[0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
    one = torch.tensor([[3.0], [-1.0]], dtype=torch.float64)
    mixed = mix_with_scaling(two, one, ScalingMixture(0.5, 4.0), likelihood="bernoulli")
    for row, (f, (q0, q1)) in enumerate(zip((3.0, -1.0), ((0.9, 0.1), (0.4, 0.6)), strict=True)):
        s = 1 / (1 + math.exp(-f / 4.0))
        assert mixed[row].tolist() == pytest.approx([0.5 * q0 + 0.5 * (1 - s), 0.5 * q1 + 0.5 * s], rel=1e-12)
    assert mix_with_scaling(two, one, None, likelihood="bernoulli") is two  # no mixture: the posterior's own
    assert mix_with_scaling(two, one, ScalingMixture(1.0, 4.0), likelihood="bernoulli") is two


def test_huge_prior_precision_recovers_temperature_scaling():
    _, params, f, batches = mlp_problem()
    factors, _ = fit_kfac(f, params, batches[:2], fisher="exact", progress=False)
    posterior = make_posterior(factors, params, 1e12)
    _, temperature, _ = tune_prior_temperature_nll(
        posterior, f, batches[2:], tune_prior=False, steps=3000, tol=1e-10, patience=300, progress=False
    )
    logits = torch.cat([f(params, b).detach() for b in batches[2:]])
    labels = torch.cat([b[1] for b in batches[2:]])
    log_t = torch.zeros((), dtype=F64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=0.5, max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert temperature == pytest.approx(float(log_t.detach().exp()), rel=2e-3)
    assert abs(math.log(temperature)) > 0.1  # the fit moved away from T = 1


def test_tempered_predictive_equals_the_predictive_of_the_tempered_function():
    _, params, f, batches = mlp_problem()
    factors, _ = fit_kfac(f, params, batches, fisher="exact", progress=False)
    posterior = make_posterior(factors, params, 2.0)
    mu, var = linearised_predictive(f, posterior, batches[0])
    mu_t, var_t = linearised_predictive(TemperedModelFunction(f, 1.7), posterior, batches[0])
    want_mu, want_var = tempered_moments(mu, var, 1.7)
    assert torch.allclose(mu_t, want_mu, rtol=1e-12) and torch.allclose(var_t, want_var, rtol=1e-10)


def test_fit_temperature_is_the_minimum_of_a_dense_grid_and_chunks_change_nothing():
    torch.manual_seed(0)
    logits = 3.0 * torch.randn(200, 5, dtype=torch.float64)
    labels = torch.where(torch.rand(200) < 0.6, logits.argmax(-1), torch.randint(0, 5, (200,)))
    T = fit_temperature(logits, labels)
    grid = torch.exp(torch.linspace(math.log(T) - 0.05, math.log(T) + 0.05, 2001, dtype=torch.float64))
    nlls = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    assert abs(math.log(float(grid[nlls.argmin()])) - math.log(T)) < 1e-4
    assert fit_temperature(logits.split(37), labels.split(37)) == pytest.approx(T, rel=1e-9)
    # overconfident logits are cooled, uninformative ones go to the upper bound
    assert T > 1.0
    assert fit_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])) == TEMPERATURE_LIMITS[1] == 4096.0


def test_fit_temperature_refuses_bad_input():
    with pytest.raises(ValueError, match="one label per row"):
        fit_temperature(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_log_grid_search_refines_between_the_best_points_neighbours():
    calls: list[float] = []

    def peaked(x: float) -> float:  # maximum at x = 3 (log2 3 = 1.585), unimodal in log x
        calls.append(x)
        return -((math.log(x) - math.log(3.0)) ** 2)

    grid = [0.5, 1.0, 2.0, 4.0, 8.0]
    assert maximise_on_log_grid(peaked, grid, 0) == 4.0 and len(calls) == 5  # grid only
    calls.clear()
    best = maximise_on_log_grid(peaked, grid, 30)
    assert best == pytest.approx(3.0, rel=1e-5) and len(calls) == 5 + 30
    assert all(2.0 <= x <= 8.0 for x in calls[5:])  # the bracket: the neighbours of 4


def untempered(f, params, batches):
    factors, state = fit_kfac(f, params, batches, fisher="exact", progress=False)
    return make_posterior(factors, params, 1.0), state.log_likelihood


def test_softening_climbs_while_the_evidence_and_the_training_fit_both_rise():
    # 30 examples, 15 % flipped at scale 3: the MAP is overconfident on its own training data
    net, params, f, batches = linear_problem(n_batches=5, seed=4)
    price = math.log(30) / 2  # BIC's price of T as one more fitted parameter
    posterior, log_likelihood = untempered(f, params, batches)
    best, table = soften_by_evidence(f, params, batches, posterior, log_likelihood, fisher="exact")
    grid = [1.0, 2.0, 4.0, 8.0, 16.0]
    full, full_table = tune_evidence_temperature(
        f, params, batches, temperatures=grid, refine_steps=0, fisher="exact", progress=False
    )
    assert best.temperature == 4.0
    # the climb is a prefix of the grid, each step up raising both the evidence and LL_T, and it
    # stops one step past its end (or at the grid's top)
    seen = [r["temperature"] for r in table]
    assert seen == grid[: len(seen)] and best.temperature in seen
    up = seen.index(best.temperature)
    for low, high in zip(table[:up], table[1 : up + 1], strict=True):
        assert high["log_evidence"] > low["log_evidence"]
        assert high["log_likelihood"] - low["log_likelihood"] > price
    if up + 1 < len(table):
        stop, last = table[up + 1], table[up]
        assert (
            stop["log_evidence"] <= last["log_evidence"]
            or stop["log_likelihood"] - last["log_likelihood"] <= price
        )
    # each evaluation is the full grid search's at that temperature (same factors, same tuning)
    for record in table:
        twin = next(r for r in full_table if r["temperature"] == record["temperature"])
        assert record["log_evidence"] == pytest.approx(twin["log_evidence"], rel=1e-6)
    # and the evidence where it stopped is the dense closed form's maximum over lambda there
    assert best.log_evidence == pytest.approx(
        profile_evidence_dense(net, batches, params, best.temperature), abs=1e-3
    )
    # T = 1 is the untempered fit's, tuned by the evidence, not a second K-FAC pass
    at_one = next(r for r in table if r["temperature"] == 1.0)
    assert at_one["log_likelihood"] == pytest.approx(float(log_likelihood), rel=1e-12)


def test_softening_keeps_t_one_when_the_evidence_prefers_sharper_and_refuses_bad_grids():
    net, params, f, batches = linear_problem(n_batches=20)
    clean = [(x, net(x).detach().argmax(-1)) for x, _ in batches]  # the MAP fits all 120 labels
    posterior, log_likelihood = untempered(f, params, clean)
    best, table = soften_by_evidence(f, params, clean, posterior, log_likelihood, fisher="exact")
    assert best.temperature == 1.0 and [r["temperature"] for r in table] == [1.0, 2.0]
    tuned, _ = tune_prior_evidence(posterior, log_likelihood, progress=False)
    assert torch.equal(best.posterior.prior_precision["weight"], tuned.prior_precision["weight"])
    with pytest.raises(ValueError, match="starts at T = 1"):
        soften_by_evidence(f, params, clean, posterior, log_likelihood, temperatures=[2.0, 4.0])


def test_softening_refuses_a_flatter_fit_that_only_the_occam_factor_favours():
    # six clean labels and a large weight: the MAP is right on all of them, yet the dense evidence
    # rises with T through the Occam factor alone (LL_T falls): the evidence-only climb would
    # flatten a correct model, the guarded one keeps T = 1
    net, params, f, batches = linear_problem(scale=2.0, n_batches=1, seed=1)
    clean = [(x, net(x).detach().argmax(-1)) for x, _ in batches]
    dense = [profile_evidence_dense(net, clean, params, t) for t in (1.0, 2.0, 4.0)]
    assert dense[0] < dense[1] < dense[2]
    posterior, log_likelihood = untempered(f, params, clean)
    evidence_only, _ = tune_evidence_temperature(
        f, params, clean, temperatures=[1.0, 2.0, 4.0], refine_steps=0, fisher="exact", progress=False
    )
    assert evidence_only.temperature == 4.0
    best, table = soften_by_evidence(f, params, clean, posterior, log_likelihood, fisher="exact")
    assert best.temperature == 1.0 and [r["temperature"] for r in table] == [1.0, 2.0]
    assert table[1]["log_evidence"] > table[0]["log_evidence"]
    assert table[1]["log_likelihood"] < table[0]["log_likelihood"]


def test_softening_needs_a_training_fit_gain_that_pays_for_the_temperature():
    # evidence and LL_T both rise at T = 2, but LL_T by less than log(30) / 2 (BIC's price of a
    # fitted parameter): the climb keeps T = 1
    net, params, f, batches = linear_problem(n_batches=5, seed=3)
    posterior, log_likelihood = untempered(f, params, batches)
    best, table = soften_by_evidence(f, params, batches, posterior, log_likelihood, fisher="exact")
    assert [r["temperature"] for r in table] == [1.0, 2.0] and best.temperature == 1.0
    gain = table[1]["log_likelihood"] - table[0]["log_likelihood"]
    assert table[1]["log_evidence"] > table[0]["log_evidence"] and 0 < gain < math.log(30) / 2
    assert table[1]["log_evidence"] == pytest.approx(
        profile_evidence_dense(net, batches, params, 2.0), abs=1e-3
    )


def test_mapped_batches_reread_on_every_pass_and_refuse_one_shot_iterators():
    batches = [{"x": torch.tensor([k])} for k in range(3)]
    moved = MappedBatches(batches, lambda b: {"x": 10 * b["x"]})
    assert [int(b["x"]) for b in moved] == [int(b["x"]) for b in moved] == [0, 10, 20]
    with pytest.raises(ValueError, match="one-shot iterator"):
        MappedBatches((b for b in batches), lambda b: b)
