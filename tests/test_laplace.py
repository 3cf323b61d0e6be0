"""The one-call entry point (flaplace.laplace.fit_laplace_lora) and validation-NLL prior tuning (flaplace.validation).

References: on a linear model the linearised predictive is exact, so the moments of the sampled
logits must match ``(f_mu, f_var)`` and the sampling predictive must match Monte Carlo on the
logit Gaussian; on a nonlinear model, logits at weight draws must approach ``f* + J delta``
(a ``jvp``) as the posterior shrinks; validation-NLL tuning must land on the optimum of a fine
grid evaluated through the public predictive and ``metrics.nll``.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn
from torch.func import jvp

from flaplace.laplace import LaplaceLoRA, fit_laplace_lora
from flaplace.links import mc_probs, predictive_probs
from flaplace.metrics import nll
from flaplace.params import ModelFunction, select_params
from flaplace.posterior import make_posterior, sample, with_prior_precision
from flaplace.predictive import linearised_predictive, predictive_precompute
from flaplace.sampling import batch_to, logits_at, sampling_probs
from flaplace.temperature import TemperedModelFunction
from flaplace.tempered_validation import MAP_LIMIT
from flaplace.typing import Eigen, KronFactor
from flaplace.validation import tune_prior_nll, validation_features, validation_nll

F64 = torch.float64


class Linear(nn.Module):
    def __init__(self, d: int = 5, c: int = 3, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, c, bias=False, dtype=F64)
        with torch.no_grad():
            self.fc.weight.copy_(scale * torch.randn(c, d, generator=g, dtype=F64))

    def forward(self, x):
        return self.fc(x)


def random_eigen(side: int, g: torch.Generator, scale: float = 3.0) -> Eigen:
    q, _ = torch.linalg.qr(torch.randn(side, side, generator=g, dtype=F64))
    return Eigen(q, torch.rand(side, generator=g, dtype=F64) * scale)


def linear_posterior(model: Linear, lam: float, seed: int = 3, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    params = select_params(model, "fc.weight")
    c, d = params["fc.weight"].shape
    factors = {
        "fc.weight": KronFactor(random_eigen(c, g, scale), random_eigen(d, g, scale), torch.tensor(False))
    }
    return params, make_posterior(factors, params, lam)


def test_sampled_logits_have_the_linearised_moments_on_a_linear_model():
    model = Linear()
    params, posterior = linear_posterior(model, lam=2.0)
    model_fn = ModelFunction(model, params)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    f_mu, f_var = linearised_predictive(model_fn, posterior, (x,))
    n = 40_000
    logits = logits_at(model_fn, sample(posterior, n, torch.Generator().manual_seed(2)), (x,))
    centred = logits - logits.mean(0)
    cov = torch.einsum("sbc,sbd->bcd", centred, centred) / (n - 1)
    scale = float(f_var.diagonal(dim1=-2, dim2=-1).max())
    assert float((logits.mean(0) - f_mu).abs().max()) < 5 * math.sqrt(scale / n)
    assert float((cov - f_var).abs().max()) < 5 * scale * math.sqrt(2 / n)


def test_sampling_predictive_matches_mc_on_the_logit_gaussian_for_a_linear_model():
    model = Linear(scale=2.0)
    params, posterior = linear_posterior(model, lam=1.0)
    model_fn = ModelFunction(model, params)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    nn_probs = sampling_probs(model_fn, posterior, (x,), 20_000, generator=torch.Generator().manual_seed(4))
    f_mu, f_var = linearised_predictive(model_fn, posterior, (x,))
    glm_probs = mc_probs(f_mu, f_var, n_samples=20_000, generator=torch.Generator().manual_seed(5))
    assert float((nn_probs - glm_probs).abs().max()) < 0.015
    # and the posterior matters: the MAP's own softmax is far off
    assert float((torch.softmax(f_mu, -1) - nn_probs).abs().max()) > 0.05


def tiny_bert(seed: int = 0):
    from tiny_models import tiny_base_model

    torch.manual_seed(seed)
    base = tiny_base_model("bert", attn_implementation="eager", initializer_range=0.2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    model = model.to(F64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def bert_batches(n_batches: int = 2, seed: int = 1):
    from tiny_models import padded_batch

    return [padded_batch("bert", n=4, length=6, seed=seed + k) for k in range(n_batches)]


@pytest.mark.parametrize("lam", [1e4, 1e6])
def test_sampled_logits_approach_the_linearisation_as_the_posterior_shrinks(lam):
    model = tiny_bert()
    la = LaplaceLoRA(model, prior_precision=lam, fisher="exact").fit(bert_batches())
    batch = bert_batches(1, seed=9)[0]
    draws = la.sample(4, torch.Generator().manual_seed(0))
    nn_logits = logits_at(la.model_fn, draws, batch)
    mean = la.posterior.mean
    for s in range(4):
        delta = {n: draws[n][s] - mean[n] for n in mean}
        f_star, j_delta = jvp(lambda p: la.model_fn(p, batch), (mean,), (delta,))
        err = float((nn_logits[s] - f_star - j_delta).abs().max())
        size = float(j_delta.abs().max())
        assert size > 0
        # the remainder is second order: relative to J delta it scales like lambda^(-1/2)
        assert err < 30 * size / math.sqrt(lam)


def test_laplace_lora_glm_equals_the_pure_functions_and_nn_is_close_for_a_tight_posterior():
    model = tiny_bert()
    train = bert_batches()
    la = fit_laplace_lora(model, train, prior="evidence", fisher="exact", jacobian_method="loop")
    batch = bert_batches(1, seed=9)[0]
    # the same posterior through the pure functions
    from flaplace.evidence import tune_prior_evidence
    from flaplace.kfac import fit

    params = select_params(model, "lora")
    factors, state = fit(la.model_fn, params, train, fisher="exact", progress=False)
    tuned, _ = tune_prior_evidence(make_posterior(factors, params, 1.0), state.log_likelihood, progress=False)
    # the one-call default is the informed predictive (the core default is the whole posterior)
    assert la.directions == "informed"
    informed = predictive_precompute(tuned, "informed")
    f_mu, f_var = linearised_predictive(la.model_fn, informed, batch, method="loop")
    torch.testing.assert_close(la(batch), predictive_probs(f_mu, f_var, "probit"))
    assert la.prior_precision == pytest.approx({n: float(v) for n, v in tuned.prior_precision.items()})
    from flaplace.evidence import log_marginal_likelihood

    torch.testing.assert_close(
        la.log_marginal_likelihood(), log_marginal_likelihood(tuned, state.log_likelihood)
    )
    # a tight posterior: the sampling predictive is the MAP softmax, as is the linearised one
    tight = LaplaceLoRA(model, prior_precision=1e8, fisher="exact", jacobian_method="loop").fit(train)
    nn_probs = tight(batch, pred_type="nn", n_samples=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nn_probs, tight(batch, link="probit"), atol=1e-3, rtol=0)
    probs, labels = la.predict_all([batch, batch])
    assert probs.shape == (8, 3) and labels is not None and labels.shape == (8,)


def overconfident_problem(n: int = 64, seed: int = 0):
    """A linear classifier with confident logits and a tenth of the labels flipped."""
    model = Linear(d=5, c=3, scale=2.5, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(n, 5, generator=g, dtype=F64)
    with torch.no_grad():
        y = model(x).argmax(-1)
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, (y + 1) % 3, y)
    return model, [(x[:32], y[:32]), (x[32:], y[32:])]


def dense_reference_nll(posterior, x, y, lam: float, link: str) -> float:
    """Validation NLL from the dense covariance inv(kron(S, A) + lambda I), written out by hand."""
    from flaplace.posterior import precision_dense

    kron = (
        precision_dense(posterior, "fc.weight")
        - torch.eye(15, dtype=F64) * posterior.prior_precision["fc.weight"]
    )
    cov = torch.linalg.inv(kron + lam * torch.eye(15, dtype=F64))
    jac = torch.einsum("ce,nd->nced", torch.eye(3, dtype=F64), x).reshape(len(x), 3, 15)  # d(W x)/d vec(W)
    f_var = jac @ cov @ jac.mT
    f_mu = x @ posterior.mean["fc.weight"].T
    if link == "probit":
        # the mean-field probit on pairwise differences: p_c ~ 1 / sum_k exp(-kappa_ck (mu_c - mu_k))
        d = f_var.diagonal(dim1=-2, dim2=-1)
        kappa = (1 + math.pi / 8 * (d[:, :, None] + d[:, None, :] - 2 * f_var)).rsqrt()
        unnormalised = 1 / torch.exp(-kappa * (f_mu[:, :, None] - f_mu[:, None, :])).sum(-1)
        probs = unnormalised / unnormalised.sum(-1, keepdim=True)
    else:
        probs = predictive_probs(f_mu, f_var, "bridge")
    return float(-probs.gather(1, y[:, None]).log().mean())


def test_val_nll_tuning_finds_the_optimum_of_a_fine_grid(link="probit"):
    model, val = overconfident_problem()
    params, posterior = linear_posterior(model, lam=10.0, scale=0.3)
    model_fn = ModelFunction(model, params)
    x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    grid = torch.logspace(-3, 3, 1201, dtype=F64).tolist()
    values = [dense_reference_nll(posterior, x, y, v, link) for v in grid]
    k = min(range(len(grid)), key=values.__getitem__)
    assert 10 < k < len(grid) - 10, "the reference optimum must be interior"
    tuned, history = tune_prior_nll(posterior, model_fn, val, link=link, progress=False, tol=1e-8)
    lam = float(tuned.prior_precision["fc.weight"])
    assert abs(math.log(lam) - math.log(grid[k])) < 0.02
    assert dense_reference_nll(posterior, x, y, lam, link) <= values[k] + 1e-7
    assert history[-1]["step"] < 300  # stopped early, on its own tolerance


def test_validation_nll_matches_the_public_path_and_its_gradient_finite_differences():
    model, val = overconfident_problem()
    params, posterior = linear_posterior(model, lam=0.7, scale=0.3)
    model_fn = ModelFunction(model, params)
    features = validation_features(posterior, model_fn, val)
    labels = torch.cat([y for _, y in val])
    probs = torch.cat([predictive_probs(*linearised_predictive(model_fn, posterior, b)) for b in val])
    assert float(validation_nll(posterior, features)) == pytest.approx(nll(probs.detach(), labels), rel=1e-10)
    t = torch.tensor(math.log(0.7), dtype=F64, requires_grad=True)
    value = validation_nll(with_prior_precision(posterior, t.exp()), features)
    (grad,) = torch.autograd.grad(value, t)
    h = 1e-5

    def at(v: float) -> float:
        return float(validation_nll(with_prior_precision(posterior, math.exp(v)), features))

    assert float(grad) == pytest.approx((at(math.log(0.7) + h) - at(math.log(0.7) - h)) / (2 * h), rel=1e-6)


def test_laplace_lora_val_nll_and_grid_methods_agree():
    model, val = overconfident_problem()
    train = [(val[0][0][:6], val[0][1][:6])]
    grid = torch.logspace(-3, 3, 121, dtype=F64).tolist()
    by_grid = LaplaceLoRA(model, include="fc.weight", fisher="exact", directions="all").fit(train)
    by_grid.optimize_prior_precision("grid", val_batches=val, grid=grid)
    by_grad = LaplaceLoRA(model, include="fc.weight", fisher="exact", directions="all").fit(train)
    by_grad.optimize_prior_precision("val_nll", val_batches=val, tol=1e-7)
    a, b = by_grid.prior_precision["fc.weight"], by_grad.prior_precision["fc.weight"]
    assert 1e-3 < a < 1e3
    assert abs(math.log(a) - math.log(b)) < 0.07  # half a grid step (ln 10 / 40 = 0.058) and some


def test_errors_are_clear():
    model, val = overconfident_problem()
    la = LaplaceLoRA(model, include="fc.weight")
    with pytest.raises(RuntimeError, match="call fit"):
        la((val[0][0],))
    la.fit(val)
    with pytest.raises(ValueError, match="needs val_batches"):
        la.optimize_prior_precision("val_nll")
    with pytest.raises(ValueError, match="needs val_batches"):
        la.optimize_prior_precision("gridsearch")  # laplace-torch's name for "grid"
    with pytest.raises(ValueError, match="differentiable"):
        tune_prior_nll(la.posterior, la.model_fn, val, link="mc", progress=False)
    with pytest.raises(ValueError, match="likelihood"):
        LaplaceLoRA(model, include="fc.weight", likelihood="gaussian")
    la.optimize_prior_precision("marglik")  # laplace-torch's name for "evidence"
    assert la.history and "log_evidence" in la.history[-1]


def test_batch_to_moves_tensors_only():
    moved = batch_to({"x": torch.ones(2), "name": "a"}, "meta")
    assert moved["x"].device.type == "meta" and moved["name"] == "a"
    assert batch_to((torch.ones(1), 3), "meta")[1] == 3


def test_informed_validation_nll_matches_the_informed_predictive():
    model, val = overconfident_problem()
    params, posterior = linear_posterior(model, lam=0.7, scale=0.3)
    model_fn = ModelFunction(model, params)
    features = validation_features(posterior, model_fn, val)
    labels = torch.cat([y for _, y in val])
    informed = predictive_precompute(posterior, "informed")
    probs = torch.cat([predictive_probs(*linearised_predictive(model_fn, informed, b)) for b in val])
    got = float(validation_nll(posterior, features, directions="informed"))
    assert got == pytest.approx(nll(probs.detach(), labels), rel=1e-10)
    assert got != pytest.approx(float(validation_nll(posterior, features)), rel=1e-6)  # the two differ here


def test_the_one_call_api_the_trainer_helpers_and_the_command_line_share_their_defaults():
    """One default per option: LaplaceLoRA, fit_laplace_lora, the Trainer helpers and ``flaplace run``."""
    import inspect

    from flaplace.app import trainer
    from flaplace.app.config import RunConfig
    from flaplace.kfac import build

    def defaults(function) -> dict:
        return {
            n: p.default
            for n, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    cli = RunConfig(model="m")
    one_call = defaults(LaplaceLoRA) | defaults(build)
    assert one_call["directions"] == cli.predictive_directions == "informed"
    assert one_call["prior_precision"] == cli.prior_precision
    for name in ("fisher", "sharing", "n_kfac", "lr_threshold"):
        assert one_call[name] == getattr(cli, name), name
    # the prior: default-val (lambda and T on validation NLL) when there is validation data, which
    # flaplace run always has, else default (the evidence); None resolves to one of the two
    assert cli.prior_tuning == "default-val"
    assert trainer.PRIOR_NAMES == {"default": "evidence_temperature", "default-val": "val_nll_temperature"}
    assert defaults(fit_laplace_lora)["prior"] is None
    assert defaults(fit_laplace_lora)["link"] == defaults(LaplaceLoRA.predict)["link"] == cli.link
    for helper in (trainer.fit_laplace, trainer.laplace_from_trainer, trainer.LaplaceCallback):
        assert defaults(helper)["prior"] is None, helper


def test_val_nll_temperature_beats_temperature_scaling_on_validation_and_is_the_default_with_val():
    """default-val: (lambda, T) jointly; never worse on validation than temperature scaling."""
    from flaplace.temperature import fit_temperature

    model, val = overconfident_problem()
    train = [(val[0][0][:6], val[0][1][:6])]
    la = fit_laplace_lora(
        model, train, val_batches=val, include="fc.weight", fisher="exact", directions="all"
    )
    assert la.temperature != 1.0 and any("temperature" in r for r in la.history)
    x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    scaling = fit_temperature(model(x).detach(), y)
    scaled_nll = float(torch.nn.functional.cross_entropy(model(x).detach() / scaling, y))
    tuned_nll = nll(torch.cat([la(b) for b in val]), y)
    assert tuned_nll <= scaled_nll + 1e-9
    # the tempered predictive is that of the logits over T
    f_mu, f_var = la.predictive(val[0])
    la_t1 = fit_laplace_lora(model, train, val_batches=val, prior="none", include="fc.weight", fisher="exact",
                             directions="all", prior_precision=la.prior_precision["fc.weight"])  # fmt: skip
    mu1, var1 = la_t1.predictive(val[0])
    torch.testing.assert_close(f_mu, mu1 / la.temperature)
    torch.testing.assert_close(f_var, var1 / la.temperature**2)
    # the probabilities average that posterior with temperature scaling by Akaike weights: the
    # grid's winner fitted one hyperparameter more, so it pays one nat of summed log-likelihood
    rows = la.history
    scaling_row = next(r for r in rows if r["prior_precision"] >= MAP_LIMIT)
    best = min(rows, key=lambda r: r["nll"])
    assert best is not scaling_row
    gain = len(y) * (scaling_row["nll"] - best["nll"])
    weight = math.exp(gain) / (math.exp(gain) + math.exp(1.0))
    assert la.scaling is not None and la.scaling.weight == pytest.approx(weight, rel=1e-12)
    assert la.scaling.temperature == pytest.approx(scaling, rel=1e-2)  # the grid's scaling = LBFGS's
    expected = weight * predictive_probs(f_mu, f_var) + (1 - weight) * torch.softmax(
        model(val[0][0]).detach() / la.scaling.temperature, -1
    )
    torch.testing.assert_close(la(val[0]), expected)
    # "nn" mixes the same way (its posterior part is a sampling predictive)
    gen = torch.Generator().manual_seed(0)
    sampled = la.predict(val[0], pred_type="nn", n_samples=8, generator=gen)
    la.scaling = None
    plain = la.predict(val[0], pred_type="nn", n_samples=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampled, weight * plain + (expected - weight * predictive_probs(f_mu, f_var)))


def test_without_validation_the_default_softens_by_the_evidence_as_the_pure_function_does():
    """default: lambda and T >= 1 by the evidence (soften_by_evidence), from the training data alone."""
    from flaplace.kfac import fit as fit_kfac
    from flaplace.tempered_evidence import soften_by_evidence

    model, train = overconfident_problem(n=96)
    la = fit_laplace_lora(model, train, include="fc.weight", fisher="exact", directions="all")
    params = select_params(model, "fc.weight")
    f = ModelFunction(model, params)
    factors, state = fit_kfac(f, params, train, fisher="exact", progress=False)
    best, table = soften_by_evidence(f, params, train, make_posterior(factors, params, 1.0), state.log_likelihood,
                                     fisher="exact")  # fmt: skip
    assert la.temperature == best.temperature > 1.0  # a tenth of the labels flipped: overconfident
    assert la.history == table
    assert la.prior_precision["fc.weight"] == pytest.approx(
        float(best.posterior.prior_precision["fc.weight"])
    )
    assert float(la.log_marginal_likelihood()) == pytest.approx(best.log_evidence, rel=1e-8)
    # the predictive is the tempered posterior's, the logits over T
    f_mu, f_var = la.predictive(train[0])
    mu_t, var_t = linearised_predictive(TemperedModelFunction(f, la.temperature), best.posterior, train[0])
    torch.testing.assert_close(f_mu, mu_t)
    torch.testing.assert_close(f_var, var_t)
    # a one-shot iterator cannot be read again: the evidence at T = 1, with a warning
    with pytest.warns(UserWarning, match="read only once"):
        once = fit_laplace_lora(model, iter(train), include="fc.weight", fisher="exact")
    assert once.temperature == 1.0
    with pytest.raises(ValueError, match="needs train_batches"):
        LaplaceLoRA(model, include="fc.weight").fit(train).optimize_prior_precision("evidence_temperature")
    with pytest.raises(ValueError, match="one-shot iterator"):
        la.optimize_prior_precision("evidence_temperature", train_batches=iter(train))
