"""The predictive of held-out completions (flaplace.text_predictive) and the samplers' ``directions``.

References: the model's own SFT loss; ``per_example_jacobians`` (``jacrev``) and
``predictive_covariance`` for the linearised logits' mean and covariance; a dense grid for the
temperature; loops for the sequence sums; the complete-basis identity of the two samplers.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from jaxtyping import TypeCheckError
from torch import nn

from flaplace.kfac import fit
from flaplace.params import ModelFunction, select_params
from flaplace.posterior import make_posterior
from flaplace.predictive import (
    informed_directions,
    per_example_jacobians,
    predictive_covariance,
    predictive_precompute,
)
from flaplace.temperature import fit_temperature
from flaplace.text_predictive import (
    map_token_log_probs,
    sequence_log_predictive,
    sequence_sum,
    supervised_tokens,
    token_log_probs,
    token_predictive,
)
from flaplace.tokens import SupervisedTokenLogits
from flaplace.typing import Eigen, KronFactor
from flaplace.vocabulary import TokenLogitsFunction, linearised_logits, sample_perturbations
from tests.tiny_models import tiny_base_model

VOCAB = 16
#: Llama's RMSNorm computes in float32 even in a float64 model: jvp and jacrev agree to its precision.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def tiny_llm(seed: int = 0) -> nn.Module:
    """A tiny random Llama (2 layers, hidden 16) with random LoRA (rank 2) on q_proj and v_proj, float64."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(tiny_base_model("llama", vocab=VOCAB), config).double().eval()


def sft_batch(n: int = 3, length: int = 7, prompt: int = 3, seed: int = 1) -> dict:
    """Token ids with labels = ids, the first ``prompt`` tokens masked; row 2 also ends with 2 masked tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    if n > 2:
        labels[2, length - 2 :] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def one_token_batch(n: int = 4, length: int = 6, seed: int = 2) -> dict:
    """Each example supervises only its last token: one row per example, as a (batch, vocab) classifier."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module")
def setup():
    model = tiny_llm()
    params = select_params(model, "lora")
    f = ModelFunction(model, params, SupervisedTokenLogits())
    factors, _ = fit(f, params, [sft_batch(seed=s) for s in range(3)], fisher="mc", progress=False)
    grid = torch.cat([(f.S.values[:, None] * f.A.values[None, :]).flatten() for f in factors.values()])
    prior = float(grid.median())  # some directions informed, some not
    return model, params, f, make_posterior(factors, params, prior)


def test_map_token_nll_is_the_models_sft_loss(setup):
    model, params, f, _ = setup
    batch = sft_batch(seed=5)
    log_probs, tokens = map_token_log_probs(f, params, batch)
    with torch.no_grad():
        loss = model(**batch).loss
    # Hugging Face computes the loss in float32 (it upcasts the logits), the model here is float64
    torch.testing.assert_close(-log_probs.mean(), loss.double(), atol=1e-6, rtol=1e-6)
    assert tokens.example.tolist() == [0] * 4 + [1] * 4 + [2] * 2


def test_every_position_model_function_gives_the_same_predictive(setup):
    model, params, f, posterior = setup
    batch = sft_batch(seed=6)
    deltas = sample_perturbations(posterior, 5, torch.Generator().manual_seed(0))
    rows = token_predictive(f, posterior, batch, perturbations=deltas)
    every = token_predictive(TokenLogitsFunction(model, params), posterior, batch, perturbations=deltas)
    for a, b in zip(rows, every, strict=True):
        torch.testing.assert_close(a, b)


def test_token_predictive_against_dense_jacobians(setup):
    """p_t = mean_s softmax(f + J delta_s) with J from jacrev; entropy, MI and the MAP from it."""
    model, params, f, posterior = setup
    batch = one_token_batch()
    deltas = sample_perturbations(posterior, 6, torch.Generator().manual_seed(1))
    pred = token_predictive(f, posterior, batch, perturbations=deltas, temperature=1.3)
    jac = per_example_jacobians(f, params, batch, method="loop")
    with torch.no_grad():
        f_mu = f(params, batch)
    shifts = sum(torch.einsum("bcoi,soi->sbc", jac[n], deltas[n]) for n in jac)
    log_samples = torch.log_softmax((f_mu + shifts) / 1.3, -1)
    samples = log_samples.exp()
    p = samples.mean(0)
    y = supervised_tokens(batch).targets
    torch.testing.assert_close(pred.log_predictive, p[torch.arange(4), y].log())
    torch.testing.assert_close(pred.sample_log_probs, log_samples[:, torch.arange(4), y], **TOL)
    torch.testing.assert_close(
        pred.map_log_probs, torch.log_softmax(f_mu / 1.3, -1)[torch.arange(4), y], **TOL
    )
    entropy = -(p * p.log()).sum(-1)
    aleatoric = -(samples * log_samples).sum(-1).mean(0)
    torch.testing.assert_close(pred.entropy, entropy, **TOL)
    torch.testing.assert_close(pred.mutual_information, entropy - aleatoric, **TOL)
    assert bool((pred.mutual_information > 0).all())


@pytest.mark.parametrize("directions", ["all", "informed"])
def test_sampled_logits_converge_to_the_linearised_moments(setup, directions):
    """Mean and covariance of f + J delta_s over 3000 draws against f_mu and J Sigma J^T (same directions)."""
    _, params, f, posterior = setup
    assert 0 < sum(informed_directions(posterior).values()) < sum(p.numel() for p in params.values())
    batch = one_token_batch()
    n = 3000
    deltas = sample_perturbations(posterior, n, torch.Generator().manual_seed(2), directions=directions)
    with torch.no_grad():
        f_mu, tangents = linearised_logits(f, posterior.mean, batch, deltas)
    f_var = predictive_covariance(
        predictive_precompute(posterior, directions), per_example_jacobians(f, params, batch, method="loop")
    )
    mean = (f_mu + tangents).mean(0)
    sd = f_var.diagonal(dim1=-2, dim2=-1).sqrt()
    assert float(((mean - f_mu).abs() / (sd / math.sqrt(n))).max()) < 5
    centred = tangents - tangents.mean(0)
    sample_cov = torch.einsum("sbc,sbd->bcd", centred, centred) / (n - 1)
    rel = (sample_cov - f_var).norm(dim=(-2, -1)) / f_var.norm(dim=(-2, -1))
    assert float(rel.max()) < 0.15, rel
    # the other directions' covariance is measurably different, so the test can tell them apart
    other = predictive_covariance(
        predictive_precompute(posterior, "informed" if directions == "all" else "all"),
        per_example_jacobians(f, params, batch, method="loop"),
    )
    assert float(((sample_cov - other).norm(dim=(-2, -1)) / other.norm(dim=(-2, -1))).max()) > 0.3


def test_informed_samples_equal_the_posteriors_when_every_direction_is_informed():
    eigen = lambda *v: Eigen(torch.linalg.qr(torch.randn(len(v), len(v)))[0], torch.tensor(v))  # noqa: E731
    torch.manual_seed(0)
    factors = {"W": KronFactor(eigen(4.0, 3.0), eigen(2.0, 1.0, 3.0), torch.tensor(False))}
    mean = {"W": torch.zeros(2, 3)}
    post = make_posterior(factors, mean, prior_precision=0.5)  # every s a >= 2 > 0.5
    every = sample_perturbations(post, 3, torch.Generator().manual_seed(0))
    informed = sample_perturbations(post, 3, torch.Generator().manual_seed(0), directions="informed")
    torch.testing.assert_close(every["W"], informed["W"])
    none = make_posterior(factors, mean, prior_precision=20.0)  # every s a <= 12 < 20
    assert not sample_perturbations(none, 2, directions="informed")["W"].any()
    with pytest.raises((ValueError, TypeCheckError)):  # the suite's type-check hook may fire first
        sample_perturbations(post, 2, directions="some")  # type: ignore[arg-type]


def test_a_sharp_posterior_is_the_map(setup):
    _, params, f, posterior = setup
    sharp = make_posterior(posterior.factors, params, 1e12)
    batch = sft_batch(seed=7)
    pred = token_predictive(f, sharp, batch, 4, generator=torch.Generator().manual_seed(0))
    map_log_probs, _ = map_token_log_probs(f, params, batch)
    torch.testing.assert_close(pred.log_predictive, map_log_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(pred.map_log_probs, map_log_probs)
    assert float(pred.mutual_information.max()) < 1e-8


def test_temperature_fit_is_the_grid_optimum():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(300, 20, generator=g, dtype=torch.float64)
    targets = torch.where(
        torch.rand(300, generator=g) < 0.5, logits.argmax(-1), torch.randint(0, 20, (300,), generator=g)
    )
    fitted = fit_temperature(logits, targets)
    grid = torch.exp(torch.linspace(math.log(0.2), math.log(20), 20001, dtype=torch.float64))
    nll = torch.cat(  # the mean NLL at every grid temperature, 2000 at a time
        [
            -torch.log_softmax(logits / t[:, None, None], -1)[:, range(300), targets].mean(-1)
            for t in grid.split(2000)
        ]
    )
    best = float(grid[nll.argmin()])
    assert abs(math.log(fitted) - math.log(best)) < 1e-3
    assert float(-token_log_probs(logits, targets, fitted).mean()) <= float(nll.min()) + 1e-9
    # chunks give the same temperature as one tensor
    assert fitted == pytest.approx(fit_temperature(logits.split(70), targets.split(70)), rel=1e-6)
    # a model too confident: T > 1; T = 1 is the plain softmax
    assert fitted > 1
    torch.testing.assert_close(
        token_log_probs(logits, targets, 1.0), torch.log_softmax(logits, -1)[range(300), targets]
    )


def test_temperature_at_the_bounds_and_misuse():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    assert fit_temperature(logits, torch.tensor([0, 0]), bounds=(0.1, 10.0)) == 0.1  # always right: sharpen
    assert fit_temperature(logits, torch.tensor([1, 1]), bounds=(0.1, 10.0)) == 10  # always wrong: flatten
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per row"):
        fit_temperature(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_sequence_helpers_against_loops():
    g = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(5, 7, generator=g, dtype=torch.float64)
    example = torch.tensor([0, 0, 2, 2, 2, 3, 3])
    summed = sequence_sum(log_probs, example, 4)
    joint = sequence_log_predictive(log_probs, example, 4)
    for e in range(4):
        rows = log_probs[:, example == e]
        torch.testing.assert_close(summed[:, e], rows.sum(-1))
        torch.testing.assert_close(joint[e], rows.sum(-1).exp().mean().log())
    assert float(joint[1]) == 0.0  # no tokens: probability 1


def test_a_batch_without_token_labels_is_refused(setup):
    _, params, f, posterior = setup
    batch = sft_batch()
    batch["labels"] = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="token labels"):
        token_predictive(f, posterior, batch, 2)
    with pytest.raises((ValueError, TypeCheckError)):  # the suite's type-check hook may fire first
        token_predictive(f, posterior, sft_batch(), 2, directions="most")  # type: ignore[arg-type]
