"""The linearised predictive: per-example Jacobians, J Sigma J^T and the link approximations.

References are independent of the code under test: ``jacrev`` of the batched model function
(its Jacobian with respect to shared weights is already per example), dense block covariances
``inv(kron(S, A) + lambda I)``, 1-D quadrature of the sigmoid-Gaussian integral, and the closed
forms of the probit and Laplace-bridge approximations written out with numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import jacrev

from flaplace.jacobians import per_example_jacobians
from flaplace.links import (
    gaussian_predictive,
    laplace_bridge_probs,
    mc_probs,
    predictive_probs,
    probit_probs,
)
from flaplace.params import LastTokenLogits, ModelFunction, classifier_logits, select_params
from flaplace.predictive import (
    PredictiveCache,
    linearised_predictive,
    predictive_covariance,
    predictive_precompute,
)
from flaplace.typing import Eigen, KronFactor, Posterior

F64 = torch.float64
#: Hugging Face models run in float32 (see lora_model); single- and batched evaluation agree to this.
HF_TOL = 1e-5


# ------------------------------------------------------------------------------------------
# Small models
# ------------------------------------------------------------------------------------------


def mlp_logits(params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A two-layer MLP with one weight stored transposed (``(in, out)``, used as ``x @ W``)."""
    hidden = torch.tanh(batch[0] @ params["w1"].T + params["b1"])
    return hidden @ params["w2_t"]


def mlp_params(dtype: torch.dtype = F64, d: int = 4, h: int = 5, c: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w1": torch.randn(h, d, generator=g, dtype=dtype),
        "b1": torch.randn(h, generator=g, dtype=dtype),
        "w2_t": torch.randn(h, c, generator=g, dtype=dtype),
    }


def lora_model(kind: str) -> tuple[ModelFunction, dict[str, torch.Tensor]]:
    """A tiny random PEFT LoRA model, LoRA weights randomised (PEFT zeroes lora_B).

    float32: in float64, transformers' eager Llama attention casts the ``finfo(float64).min``
    mask to float32 inside its softmax, so rows that are entirely padding become NaN and spread.
    """
    from peft import LoraConfig, get_peft_model
    from tiny_models import LORA_TARGETS, tiny_base_model

    torch.manual_seed(0)
    settings: dict[str, object] = {"initializer_range": 0.2, "attn_implementation": "eager"}
    if kind == "gpt2":
        settings["n_positions"] = 16
    model = tiny_base_model(kind, hidden=32, vocab=64, **settings)
    targets = LORA_TARGETS[kind]
    output_fn = {"llama": LastTokenLogits([3, 5, 7]), "gpt2": LastTokenLogits([3, 5])}.get(
        kind, classifier_logits
    )
    model = get_peft_model(
        model, LoraConfig(r=2, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=kind == "gpt2")
    ).eval()
    params = select_params(model, "lora")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return ModelFunction(model, params, output_fn), params


def padded_batch(n: int = 5, length: int = 6, *, left: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for row, pad in [(1, 2), (3, 1), (4, 3)]:
        if row < n:
            if left:
                mask[row, :pad] = 0
            else:
                mask[row, length - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_jacobians_close(jac: dict, reference: dict, tol: float) -> None:
    assert set(jac) == set(reference)
    for name in reference:
        assert jac[name].shape == reference[name].shape, name
        scale = reference[name].abs().max().item()
        torch.testing.assert_close(jac[name], reference[name], rtol=tol, atol=tol * scale)


# ------------------------------------------------------------------------------------------
# Per-example Jacobians
# ------------------------------------------------------------------------------------------


def test_jacobians_of_mlp_match_jacrev_of_batched_function() -> None:
    params = mlp_params()
    x = torch.randn(7, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    batch = (x, torch.zeros(7, dtype=torch.long))
    # d f(x_b)_c / d theta for the batched function is (B, C, *shape): already per example.
    reference = jacrev(mlp_logits)(params, batch)
    assert reference["w1"].shape == (7, 3, 5, 4)
    for chunk_size in (None, 2, 7):
        assert_jacobians_close(
            per_example_jacobians(mlp_logits, params, batch, chunk_size=chunk_size), reference, 1e-12
        )
    assert_jacobians_close(per_example_jacobians(mlp_logits, params, batch, method="loop"), reference, 1e-12)


def test_jacobians_differentiate_one_example_at_a_time() -> None:
    seen = []

    def recording(params, batch):
        seen.append(tuple(batch[0].shape))
        return mlp_logits(params, batch)

    x = torch.randn(6, 4, dtype=F64)
    per_example_jacobians(recording, mlp_params(), (x,), chunk_size=3)
    per_example_jacobians(recording, mlp_params(), (x,), method="loop")
    assert seen and all(shape == (1, 4) for shape in seen)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_jacobians_of_lora_decoder_with_left_padding(kind: str) -> None:
    f, params = lora_model(kind)
    batch = padded_batch(left=True)
    reference = jacrev(f)(params, batch)
    assert all(r.abs().max() > 1e-2 for r in reference.values())  # LoRA weights are nontrivial
    full = per_example_jacobians(f, params, batch)
    assert_jacobians_close(full, reference, HF_TOL)
    assert_jacobians_close(per_example_jacobians(f, params, batch, chunk_size=2), full, HF_TOL)
    # The padding matters: the same token ids without a mask give other Jacobians.
    unpadded = per_example_jacobians(f, params, {"input_ids": batch["input_ids"]})
    name = next(iter(params))
    assert (unpadded[name][1] - full[name][1]).abs().max() > 1e-6


def test_jacobians_of_lora_bert_classifier() -> None:
    f, params = lora_model("bert")
    batch = padded_batch(left=False)
    reference = jacrev(f)(params, batch)
    assert all(r.abs().max() > 1e-2 for r in reference.values())
    # transformers' bidirectional mask creation branches on mask values, which vmap cannot
    # trace; the loop works with the 2-D mask, vmap with an equivalent 4-D additive mask.
    assert_jacobians_close(per_example_jacobians(f, params, batch, method="loop"), reference, HF_TOL)
    additive = torch.zeros(5, 1, 1, 6)
    additive[batch["attention_mask"][:, None, None, :] == 0] = torch.finfo(torch.float32).min
    batch_4d = {"input_ids": batch["input_ids"], "attention_mask": additive}
    assert_jacobians_close(per_example_jacobians(f, params, batch_4d), reference, HF_TOL)
    assert_jacobians_close(per_example_jacobians(f, params, batch_4d, chunk_size=2), reference, HF_TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_captured_jacobians_match_jacrev_with_default_attention(arch: str) -> None:
    """method="capture": one batched forward, no vmap over the model, so sdpa and 2-D masks work."""
    from tiny_models import ANSWERS, tiny_lora_model
    from tiny_models import padded_batch as tiny_padded_batch

    model = tiny_lora_model(arch)
    params = select_params(model, "lora")
    f = ModelFunction(model, params, classifier_logits if arch == "bert" else LastTokenLogits(ANSWERS))
    batch = tiny_padded_batch(arch, n=4)
    reference = jacrev(f)(params, batch)
    assert all(r.abs().max() > 1e-6 for r in reference.values())
    captured = per_example_jacobians(f, params, batch, method="capture")
    assert_jacobians_close(captured, reference, 1e-6)
    assert_jacobians_close(
        per_example_jacobians(f, params, batch, method="capture", chunk_size=3), captured, 1e-12
    )


def test_captured_jacobians_of_a_transposed_conv1d_weight() -> None:
    from tiny_models import ANSWERS, tiny_lora_model
    from tiny_models import padded_batch as tiny_padded_batch

    model = tiny_lora_model("gpt2")
    params = select_params(model, "h.1.attn.c_attn.base_layer.weight")
    f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    batch = tiny_padded_batch("gpt2", n=3)
    assert_jacobians_close(
        per_example_jacobians(f, params, batch, method="capture"), jacrev(f)(params, batch), 1e-6
    )


def test_jacobian_errors_are_clear() -> None:
    params = mlp_params()
    x = torch.randn(4, 4, dtype=F64)
    with pytest.raises(ValueError, match="same leading"):
        per_example_jacobians(mlp_logits, params, (x, torch.zeros(3)))
    with pytest.raises(ValueError, match="empty"):
        per_example_jacobians(mlp_logits, params, (x[:0],))
    with pytest.raises(ValueError, match="params is empty"):
        per_example_jacobians(mlp_logits, {}, (x,))
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_jacobians(mlp_logits, params, (x,), chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        # __wrapped__: the library's own check, under the test suite's type-checking hook.
        per_example_jacobians.__wrapped__(mlp_logits, params, (x,), method="batched")
    with pytest.raises(ValueError, match="logits"):
        per_example_jacobians(lambda p, b: mlp_logits(p, b)[:, 0], params, (x,))

    def branching(p, batch):
        if (batch[0] > 0).any():  # data-dependent control flow: vmap cannot trace it
            return mlp_logits(p, batch)
        return -mlp_logits(p, batch)

    with pytest.raises(RuntimeError, match="method='loop'"):
        per_example_jacobians(branching, params, (x,), method="vmap")
    reference = jacrev(lambda p: torch.cat([branching(p, (x[b : b + 1],)) for b in range(4)]))(params)
    assert_jacobians_close(per_example_jacobians(branching, params, (x,), method="loop"), reference, 1e-12)
    # The default ("auto") falls back from capture (biases) and vmap (branching) to the loop.
    assert_jacobians_close(per_example_jacobians(branching, params, (x,)), reference, 1e-12)


# ------------------------------------------------------------------------------------------
# Predictive covariance against a dense Sigma
# ------------------------------------------------------------------------------------------


def random_eigen(d: int, k: int, g: torch.Generator) -> Eigen:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return Eigen(q[:, :k].contiguous(), torch.rand(k, generator=g, dtype=F64) * 3 + 0.1)


def dense(e: Eigen) -> torch.Tensor:
    return e.dense()


def dense_covariance(posterior: Posterior) -> torch.Tensor:
    """Block-diagonal Sigma over the concatenated row-major (o, i) weights, by explicit inverse."""
    blocks = []
    for name, factor in posterior.factors.items():
        precision = torch.kron(dense(factor.S), dense(factor.A))
        lam = posterior.prior_precision[name]
        blocks.append(torch.linalg.inv(precision + lam * torch.eye(precision.shape[0], dtype=F64)))
    return torch.block_diag(*blocks)


def flat_jacobian(posterior: Posterior, jacobians: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C, D): each block's slices put in (o, i) orientation, then flattened row-major."""
    parts = []
    for name, factor in posterior.factors.items():
        jac = jacobians[name]
        if factor.transposed:
            jac = jac.transpose(-1, -2)
        parts.append(jac.reshape(*jac.shape[:2], -1))
    return torch.cat(parts, dim=-1)


def make_posterior(spec: dict[str, tuple[int, int, int, int, bool]], seed: int = 5) -> Posterior:
    """spec[name] = (o, i, ks, ka, transposed); the mean is stored (i, o) when transposed."""
    g = torch.Generator().manual_seed(seed)
    mean, factors, prior = {}, {}, {}
    for index, (name, (o, i, ks, ka, transposed)) in enumerate(spec.items()):
        mean[name] = torch.randn((i, o) if transposed else (o, i), generator=g, dtype=F64)
        factors[name] = KronFactor(random_eigen(o, ks, g), random_eigen(i, ka, g), torch.tensor(transposed))
        prior[name] = torch.tensor(0.5 + index, dtype=F64)
    return Posterior(mean, factors, prior)


SPECS = {
    "full": {"a": (3, 4, 3, 4, False), "b": (2, 5, 2, 5, False)},
    "thin": {"a": (3, 4, 2, 1, False), "b": (5, 2, 3, 2, False)},
    "transposed": {"a": (3, 4, 3, 2, True), "b": (2, 5, 1, 5, False), "square": (3, 3, 2, 3, True)},
}


@pytest.mark.parametrize("case", list(SPECS))
def test_predictive_covariance_matches_dense(case: str) -> None:
    posterior = make_posterior(SPECS[case])
    g = torch.Generator().manual_seed(6)
    jac = {name: torch.randn(4, 3, *p.shape, generator=g, dtype=F64) for name, p in posterior.mean.items()}
    J = flat_jacobian(posterior, jac)
    reference = J @ dense_covariance(posterior) @ J.transpose(-1, -2)
    f_var = predictive_covariance(posterior, jac)
    assert f_var.shape == (4, 3, 3)
    torch.testing.assert_close(f_var, reference, rtol=1e-8, atol=1e-8)
    cache = predictive_precompute(posterior)
    torch.testing.assert_close(predictive_covariance(cache, jac), reference, rtol=1e-8, atol=1e-8)
    if case == "transposed":  # the flag matters for the square block, whose shape cannot tell
        flipped = posterior.factors["square"]._replace(transposed=torch.tensor(False))
        wrong = posterior._replace(factors={**posterior.factors, "square": flipped})
        assert (predictive_covariance(wrong, jac) - reference).abs().max() > 1e-3


def test_predictive_covariance_is_differentiable_in_prior_precision() -> None:
    posterior = make_posterior(SPECS["thin"])
    jac = {name: torch.randn(2, 3, *p.shape, dtype=F64) for name, p in posterior.mean.items()}
    log_lam = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def total(log_prior: torch.Tensor) -> torch.Tensor:
        prior = {name: log_prior.exp() for name in posterior.mean}
        return predictive_covariance(posterior._replace(prior_precision=prior), jac).sum()

    (grad,) = torch.autograd.grad(total(log_lam), log_lam)
    eps = 1e-6
    fd = (total(log_lam.detach() + eps) - total(log_lam.detach() - eps)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_linearised_predictive_on_mlp_matches_dense() -> None:
    params = mlp_params()
    g = torch.Generator().manual_seed(7)
    factors = {
        "w1": KronFactor(random_eigen(5, 2, g), random_eigen(4, 4, g), torch.tensor(False)),
        "b1": None,
        "w2_t": KronFactor(random_eigen(3, 3, g), random_eigen(5, 2, g), torch.tensor(True)),
    }
    params.pop("b1")
    factors.pop("b1")
    posterior = Posterior(params, factors, {n: torch.tensor(2.0, dtype=F64) for n in params})

    def model_fn(p, batch):
        return mlp_logits({**p, "b1": torch.zeros(5, dtype=F64)}, batch)

    x = torch.randn(6, 4, dtype=F64, generator=g)
    f_mu, f_var = linearised_predictive(model_fn, posterior, (x,), chunk_size=4)
    torch.testing.assert_close(f_mu, model_fn(params, (x,)), rtol=1e-12, atol=1e-12)
    J = flat_jacobian(posterior, jacrev(model_fn)(params, (x,)))
    torch.testing.assert_close(f_var, J @ dense_covariance(posterior) @ J.mT, rtol=1e-8, atol=1e-8)
    assert isinstance(predictive_precompute(posterior), PredictiveCache)


def test_predictive_covariance_errors_are_clear() -> None:
    posterior = make_posterior(SPECS["thin"])
    jac = {name: torch.randn(2, 3, *p.shape, dtype=F64) for name, p in posterior.mean.items()}
    with pytest.raises(ValueError, match="same names"):
        predictive_covariance(posterior, {"a": jac["a"]})
    with pytest.raises(ValueError, match="do not fit"):
        predictive_covariance(posterior, {**jac, "a": torch.randn(2, 3, 4, 4, dtype=F64)})
    with pytest.raises(ValueError, match="non-finite"):
        predictive_covariance(posterior, {**jac, "a": jac["a"] * math.nan})
    with pytest.raises(ValueError, match="positive"):
        predictive_precompute(
            posterior._replace(prior_precision={**posterior.prior_precision, "a": torch.tensor(-1.0)})
        )
    wrong_flag = posterior.factors["a"]._replace(transposed=torch.tensor(True))
    with pytest.raises(ValueError, match="transposed flag"):
        predictive_covariance(posterior._replace(factors={**posterior.factors, "a": wrong_flag}), jac)


# ------------------------------------------------------------------------------------------
# Link approximations
# ------------------------------------------------------------------------------------------


def sigmoid_gaussian_expectation(mean: float, var: float) -> float:
    """E[sigmoid(z)], z ~ N(mean, var), by the trapezoid rule on +-12 standard deviations."""
    sd = math.sqrt(var)
    z = torch.linspace(mean - 12 * sd, mean + 12 * sd, 40001, dtype=F64)
    density = torch.exp(-0.5 * ((z - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    return torch.trapezoid(torch.sigmoid(z) * density, z).item()


def test_mc_matches_quadrature_for_one_logit() -> None:
    f_mu = torch.tensor([[2.5], [-3.0]], dtype=F64)
    f_var = torch.tensor([[[0.5]], [[0.8]]], dtype=F64)
    probs = mc_probs(
        f_mu, f_var, n_samples=100_000, generator=torch.Generator().manual_seed(0), likelihood="bernoulli"
    )
    assert probs.shape == (2, 2)
    exact = torch.tensor(
        [sigmoid_gaussian_expectation(2.5, 0.5), sigmoid_gaussian_expectation(-3.0, 0.8)], dtype=F64
    )
    # The standard error of the mean of sigmoid(z) over 1e5 samples is 1.9e-4 here: 1e-3 is
    # over 5 of them, while the plug-in sigmoid(mean) is off by 1.5e-2.
    torch.testing.assert_close(probs[:, 1], exact, rtol=0, atol=1e-3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=F64))
    # Averaging logits before the sigmoid would be off by far more than the tolerance.
    assert (torch.sigmoid(f_mu[:, 0]) - exact).abs().min() > 1e-2


def test_mc_matches_quadrature_for_two_logits() -> None:
    f_mu = torch.tensor([[0.3, 2.8]], dtype=F64)
    f_var = torch.tensor([[[0.5, 0.1], [0.1, 0.3]]], dtype=F64)
    probs = mc_probs(f_mu, f_var, n_samples=100_000, generator=torch.Generator().manual_seed(1))
    # p_1 = E[sigmoid(f_1 - f_0)], f_1 - f_0 ~ N(2.5, 0.5 + 0.3 - 2 * 0.1); standard error 2.1e-4.
    exact = sigmoid_gaussian_expectation(2.5, 0.6)
    assert abs(probs[0, 1].item() - exact) < 1e-3
    assert abs(probs[0, 0].item() - (1 - exact)) < 1e-3
    assert abs(torch.sigmoid(torch.tensor(2.5)).item() - exact) > 1e-2


def test_mc_is_reproducible_and_respects_dtype() -> None:
    f_mu = torch.randn(3, 4)
    a = torch.randn(3, 4, 4)
    f_var = a @ a.mT
    one = mc_probs(f_mu, f_var, n_samples=50, generator=torch.Generator().manual_seed(3))
    two = mc_probs(f_mu, f_var, n_samples=50, generator=torch.Generator().manual_seed(3))
    assert one.dtype == torch.float32 and torch.equal(one, two)
    # A singular covariance (rank one) is fine: no Cholesky, no jitter needed.
    v = torch.randn(3, 4, 1)
    assert torch.isfinite(mc_probs(f_mu, v @ v.mT, n_samples=10)).all()


def test_probit_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, 4))
    a = rng.normal(size=(3, 4, 4))
    var = a @ a.transpose(0, 2, 1)
    # Mean-field probit on the logit differences: p_c proportional to
    # 1 / sum_k exp(-(mu_c - mu_k) / sqrt(1 + pi/8 Var(f_c - f_k))), normalised.
    expected = np.empty_like(mu)
    for b in range(3):
        unnormalised = []
        for c in range(4):
            pair_var = [var[b, c, c] + var[b, k, k] - 2 * var[b, c, k] for k in range(4)]
            scaled = [(mu[b, c] - mu[b, k]) / math.sqrt(1 + math.pi * pair_var[k] / 8) for k in range(4)]
            unnormalised.append(1 / np.sum(np.exp(-np.array(scaled))))
        expected[b] = np.array(unnormalised) / np.sum(unnormalised)
    probs = probit_probs(torch.from_numpy(mu), torch.from_numpy(var))
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-12)
    binary = probit_probs(
        torch.tensor([[0.8]], dtype=F64), torch.tensor([[[2.0]]], dtype=F64), likelihood="bernoulli"
    )
    p = 1 / (1 + math.exp(-0.8 / math.sqrt(1 + math.pi * 2.0 / 8)))
    np.testing.assert_allclose(binary.numpy(), [[1 - p, p]], rtol=1e-12)
    # It approximates the exact integral to within its known accuracy (~1e-2).
    assert abs(p - sigmoid_gaussian_expectation(0.8, 2.0)) < 1e-2


def bridge_reference(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Dirichlet mean of the Laplace bridge of the centred Gaussian N(P mu, P var P), P = I - 11^T/K."""
    k = mu.shape[0]
    projection = np.eye(k) - np.ones((k, k)) / k
    mu_c = projection @ mu
    var_c = projection @ var @ projection
    alpha = np.array(
        [
            (1 - 2 / k + math.exp(mu_c[j]) / k**2 * sum(math.exp(-m) for m in mu_c)) / var_c[j, j]
            for j in range(k)
        ]
    )
    return alpha / alpha.sum()


def test_laplace_bridge_matches_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(3, 4))
    a = rng.normal(size=(3, 4, 4))
    var = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(4)
    expected = np.stack([bridge_reference(mu[b], var[b]) for b in range(3)])
    probs = laplace_bridge_probs(torch.from_numpy(mu), torch.from_numpy(var))
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-10)
    # Binary: logits (-f/2, f/2); the Dirichlet mean is then exactly sigmoid(mean).
    binary = laplace_bridge_probs(
        torch.tensor([[0.8], [-2.0]], dtype=F64),
        torch.tensor([[[2.0]], [[0.3]]], dtype=F64),
        likelihood="bernoulli",
    )
    p = torch.sigmoid(torch.tensor([0.8, -2.0], dtype=F64))
    torch.testing.assert_close(binary, torch.stack([1 - p, p], -1), rtol=1e-12, atol=1e-12)


def test_dispatcher_and_gaussian() -> None:
    f_mu = torch.randn(2, 3, dtype=F64)
    a = torch.randn(2, 3, 3, dtype=F64)
    f_var = a @ a.mT
    torch.testing.assert_close(predictive_probs(f_mu, f_var), probit_probs(f_mu, f_var))
    torch.testing.assert_close(predictive_probs(f_mu, f_var, "bridge"), laplace_bridge_probs(f_mu, f_var))
    g = torch.Generator().manual_seed(0)
    mc = predictive_probs(f_mu, f_var, "mc", n_samples=20, generator=g)
    torch.testing.assert_close(mc, mc_probs(f_mu, f_var, 20, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="link"):
        predictive_probs.__wrapped__(f_mu, f_var, "sample")
    with pytest.raises(ValueError, match="gaussian"):
        predictive_probs(f_mu, f_var, likelihood="gaussian")
    with pytest.raises(ValueError, match="one logit"):
        probit_probs(f_mu, f_var, likelihood="bernoulli")
    with pytest.raises(ValueError, match="f_var"):
        probit_probs.__wrapped__(f_mu, f_var[:, :2])
    with pytest.raises(ValueError, match="non-finite"):
        probit_probs(f_mu * math.inf, f_var)
    mean, cov = gaussian_predictive(f_mu, f_var, 0.5)
    torch.testing.assert_close(mean, f_mu)
    torch.testing.assert_close(cov, f_var + 0.25 * torch.eye(3, dtype=F64))
    _, cov = gaussian_predictive(f_mu, f_var, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(
        cov - f_var, torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=F64)).expand(2, 3, 3)
    )
    with pytest.raises(ValueError, match="sigma"):
        gaussian_predictive(f_mu, f_var, torch.ones(2))


# ------------------------------------------------------------------------------------------
# Compilation without graph breaks
# ------------------------------------------------------------------------------------------


def unchecked_predictive_module(module: str = "predictive"):
    """flaplace/<module>.py loaded under another name, outside the test suite's type-checking hook.

    Dynamo cannot trace through the jaxtyping + beartype wrappers that tests/conftest.py adds to
    every flaplace function (beartype reports a "desynchronization" on the traced return value).
    The library itself carries no such wrappers, so the compile tests use the plain module.
    """
    import importlib
    import importlib.util
    import sys

    checked = importlib.import_module(f"flaplace.{module}")
    name = f"_flaplace_{module}_unchecked"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, checked.__file__)
    module_object = importlib.util.module_from_spec(spec)
    sys.modules[name] = module_object  # dynamo looks traced functions' modules up by name
    spec.loader.exec_module(module_object)
    assert not hasattr(module_object.__dict__[checked.__all__[-1]], "__wrapped__")
    return module_object


def test_covariance_and_predictive_step_compile_without_graph_breaks() -> None:
    import torch._dynamo

    plain = unchecked_predictive_module()
    plain_links = unchecked_predictive_module("links")
    plain.jacobians_and_logits = unchecked_predictive_module(
        "jacobians"
    ).jacobians_and_logits  # from flaplace.jacobians
    torch._dynamo.reset()
    posterior = make_posterior(SPECS["transposed"])
    jac = {name: torch.randn(4, 3, *p.shape, dtype=F64) for name, p in posterior.mean.items()}
    cache = plain.predictive_precompute(posterior)
    for given in (posterior, cache):
        explained = torch._dynamo.explain(plain.predictive_covariance)(given, jac)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1

    params = mlp_params()
    g = torch.Generator().manual_seed(8)
    mlp_posterior = Posterior(
        {"w1": params["w1"]},
        {"w1": KronFactor(random_eigen(5, 2, g), random_eigen(4, 3, g), torch.tensor(False))},
        {"w1": torch.tensor(1.5, dtype=F64)},
    )

    def model_fn(p, batch):
        return mlp_logits({**params, **p}, batch)

    def step(x: torch.Tensor) -> torch.Tensor:
        f_mu, f_var = plain.linearised_predictive(model_fn, mlp_posterior, (x,))
        return plain_links.probit_probs(f_mu, f_var)

    x = torch.randn(6, 4, dtype=F64, generator=g)
    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


def test_captured_jacobians_of_a_pooled_classifier_head() -> None:
    from tiny_models import padded_batch as tiny_padded_batch
    from tiny_models import tiny_lora_model

    model = tiny_lora_model("bert")
    head = "base_model.model.classifier.weight"
    params = {**select_params(model, "lora"), head: dict(model.named_parameters())[head].detach()}
    f = ModelFunction(model, params, classifier_logits)
    batch = tiny_padded_batch("bert", n=3)
    assert_jacobians_close(
        per_example_jacobians(f, params, batch, method="capture"), jacrev(f)(params, batch), 1e-6
    )
