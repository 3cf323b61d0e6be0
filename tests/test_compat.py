"""flaplace.compat: bayesian-lora 0.0.6's README usage on a tiny PEFT Llama, against dense references.

Also pins the bayesian-lora behaviours that docs/compat.md describes (its evidence formula, its
factor normalisation, its default output callback, its README sampling snippet), by running the
installed ``bayesian_lora`` package on the same inputs.
"""

from __future__ import annotations

import warnings

import bayesian_lora
import bayesian_lora.main
import pytest
import torch
from tiny_models import ANSWERS, float64_rms_norm, padded_batch, tiny_lora_model
from torch import nn
from torch.func import jacrev
from transformers import BatchEncoding

import flaplace
from flaplace import compat

DTYPE = torch.float64
N_LORA, N_KFAC, LR_THRESHOLD = 2, 4, 8  # hidden 16 >= 8: the 16-sides are low rank, the 2-sides dense
N_CLASSES = len(ANSWERS)


# ------------------------------------------------------------------------------------ helpers


def training_batches() -> list[dict[str, torch.Tensor]]:
    return [padded_batch("llama", n=4, length=6, seed=seed) for seed in (1, 2, 3)]


def as_prompts(batch: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """The README's loaders yield text: each example's real tokens as a string, and the labels."""
    prompts = [
        " ".join(str(int(t)) for t in ids[mask.bool()])
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    return prompts, batch["labels"]


def tokenizer(prompts: list[str]) -> dict[str, torch.Tensor]:
    """A stand-in for a Hugging Face tokenizer with left padding (pad id 0)."""
    rows = [[int(t) for t in p.split()] for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, length - len(row) :] = torch.tensor(row)
        mask[n, length - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def fwd_call(model: nn.Module, batch_prompts) -> torch.Tensor:
    """The README's forward wrapper: tokenise, run, last-token logits of the answer tokens."""
    prompts, _ = batch_prompts
    outputs = model(**tokenizer(prompts))
    return outputs.logits[:, -1, list(ANSWERS)]


def tensor_fwd_call(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
        :, -1, list(ANSWERS)
    ]


def summed_log_likelihood(model: nn.Module, batches) -> torch.Tensor:
    with torch.no_grad():
        return sum(
            torch.log_softmax(tensor_fwd_call(model, b), -1).gather(1, b["labels"][:, None]).sum()
            for b in batches
        )


def weight_of(model: nn.Module, key: str) -> torch.Tensor:
    return dict(model.named_parameters())[f"{key}.weight"].detach()


def dense_blocks(factors, s2: float):
    """Per block: ``P = S (x) A + I/s2`` in row-major vec of the (o, i) weight, from the roots."""
    blocks = {}
    for key, (a_root, s_root) in factors.items():
        kron = torch.kron(s_root @ s_root.T, a_root @ a_root.T)
        blocks[key] = kron + torch.eye(kron.shape[0], dtype=DTYPE) / s2
    return blocks


def dense_log_evidence(model, factors, ll: float, s2: float) -> float:
    """``LL - 1/2 theta^T P0 theta - 1/2 (logdet P - logdet P0)`` with every matrix materialised."""
    blocks = dense_blocks(factors, s2)
    p = torch.block_diag(*blocks.values())
    p0 = torch.eye(p.shape[0], dtype=DTYPE) / s2
    theta = torch.cat([weight_of(model, key).reshape(-1) for key in factors])
    sign_p, logdet_p = torch.linalg.slogdet(p)
    sign_p0, logdet_p0 = torch.linalg.slogdet(p0)
    assert sign_p > 0 and sign_p0 > 0
    return float(ll - 0.5 * theta @ p0 @ theta - 0.5 * (logdet_p - logdet_p0))


def dense_f_var(jacobian, factors, s2: float) -> torch.Tensor:
    """``J Sigma J^T`` with ``Sigma`` the explicit inverse of the block-diagonal precision."""
    sigma = torch.linalg.inv(torch.block_diag(*dense_blocks(factors, s2).values()))
    rows = torch.cat([jacobian[f"{key}.weight"].flatten(2) for key in factors], dim=-1)  # (B, C, D)
    return rows @ sigma @ rows.mT


@pytest.fixture(scope="module")
def setup():
    model = tiny_lora_model("llama", dtype=DTYPE)
    batches = training_batches()
    loader = [as_prompts(b) for b in batches]
    factors = compat.calculate_kronecker_factors(
        model,
        fwd_call,
        loader,
        N_KFAC,
        LR_THRESHOLD,
        ["lora"],
        use_tqdm=False,
        generator=torch.Generator().manual_seed(0),
    )
    return model, batches, factors


# ------------------------------------------------------------------------------------ README flow


def test_readme_usage_end_to_end(setup) -> None:
    """factors -> evidence -> s2 tuning -> jacobian_mean -> variance -> probabilities, as in the README."""
    model, batches, factors = setup
    # Layout: {module name: (A, S)}; the r-sides dense (r, r) roots, the 16-sides (16, n_kfac) roots.
    assert len(factors) == 8
    for key, (A, S) in factors.items():
        assert key.endswith(".default") and "lora_" in key
        wide_input = "lora_A" in key
        assert A.shape == ((16, N_KFAC) if wide_input else (N_LORA, N_LORA))
        assert S.shape == ((N_LORA, N_LORA) if wide_input else (16, N_KFAC))

    # Model evidence, and a few steps of prior-variance tuning raise it.
    LL = summed_log_likelihood(model, batches)
    s2 = torch.tensor(0.05, dtype=DTYPE, requires_grad=True)
    evidence = compat.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2)
    assert float(evidence.detach()) == pytest.approx(
        dense_log_evidence(model, factors, float(LL), 0.05), rel=1e-10
    )
    opt = torch.optim.Adam([s2], lr=1e-2)
    history = []
    for _ in range(10):
        opt.zero_grad()
        loss = -compat.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2)
        loss.backward()
        opt.step()
        history.append(-float(loss.detach()))
    assert history[-1] > history[0] + 1.0
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))

    # Posterior predictive, under no_grad as in the README.
    s2 = s2.detach()
    batch_inputs = {k: v for k, v in padded_batch("llama", n=5, seed=9).items() if k != "labels"}
    with torch.no_grad():
        jacobian, f_mu = compat.jacobian_mean(model, batch_inputs, torch.tensor(ANSWERS))
        f_var = compat.variance(batch_inputs, jacobian, factors, s2, N_CLASSES, N_LORA, N_KFAC, "cpu")
    assert f_mu.shape == (5, N_CLASSES) and f_var.shape == (5, N_CLASSES, N_CLASSES)
    torch.testing.assert_close(f_mu, tensor_fwd_call(model, batch_inputs).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_var, dense_f_var(jacobian, factors, float(s2)), rtol=1e-8, atol=1e-12)

    # Sample logits, squash each sample, average the probabilities.
    L = compat.stable_cholesky(f_var)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(100_000, *f_mu.shape, 1, generator=g, dtype=DTYPE)
    probs = (f_mu[..., None] + L @ eps).squeeze(-1).softmax(-1).mean(0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=DTYPE))
    reference = flaplace.mc_probs(f_mu, f_var, n_samples=100_000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(probs, reference, rtol=0, atol=5e-3)


def test_readme_sampling_snippet_has_broken_shapes() -> None:
    """The README's sampling lines multiply (s, B, C, C) by (s, B, C): it fails unless B == s or 1."""
    f_mu, f_var = torch.zeros(4, 3), torch.eye(3).expand(4, 3, 3)
    L = torch.linalg.cholesky(f_var)
    samples = 1000
    f_mu = f_mu.expand(samples, *f_mu.shape)
    L = L.expand(samples, *L.shape)
    eps = torch.randn_like(f_mu)
    with pytest.raises(RuntimeError):
        (f_mu + L @ eps).squeeze(-1).softmax(-1).mean(0)


# ------------------------------------------------------------------------------------ factors


def test_compat_factors_equal_flaplace_factors(setup) -> None:
    """Same data, same generator: compat's roots reproduce flaplace's own K-FAC ("last" sharing)."""
    model, batches, factors = setup
    params = flaplace.select_params(model, "lora")
    model_fn = flaplace.ModelFunction(model, params, flaplace.LastTokenLogits(ANSWERS))
    reference, _ = flaplace.fit_kfac(
        model_fn,
        params,
        batches,
        sharing="last",
        fisher="mc",
        n_kfac=N_KFAC,
        lr_threshold=LR_THRESHOLD,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert {f"{key}.weight" for key in factors} == set(reference)
    for key, (A, S) in factors.items():
        ref = reference[f"{key}.weight"]
        for root, eigen in ((A, ref.A), (S, ref.S)):
            want = eigen.dense()
            torch.testing.assert_close(root @ root.T, want, rtol=1e-10, atol=1e-12)


def test_text_batches_and_tensor_batches_give_the_same_factors(setup) -> None:
    """Prompts tokenised inside forward_call (layout found by a probe forward) = tensor batches."""
    model, batches, factors = setup
    from_tensors = compat.calculate_kronecker_factors(
        model,
        tensor_fwd_call,
        batches,
        N_KFAC,
        LR_THRESHOLD,
        ["lora"],
        generator=torch.Generator().manual_seed(0),
    )
    for key, (A, S) in factors.items():
        torch.testing.assert_close(
            A @ A.T, from_tensors[key][0] @ from_tensors[key][0].T, rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            S @ S.T, from_tensors[key][1] @ from_tensors[key][1].T, rtol=1e-10, atol=1e-12
        )


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_factor_normalisation_against_closed_form_and_bayesian_lora() -> None:
    """One linear layer read at the last position: exact GGN factors in closed form.

    flaplace: ``S = sum_n (diag p - p p^T)`` (summed), ``A = mean_n x x^T`` (averaged).
    bayesian-lora (dense): ``A = sum_n x x^T / number of batches``; low rank: not divided at all.
    bayesian-lora also leaves the model in train mode.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3, bias=False)).to(DTYPE).eval()
    batches = [torch.randn(4, 5, 6, dtype=DTYPE) for _ in range(3)]

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)[:, -1]

    (A, S), *_ = compat.calculate_kronecker_factors(model, call, batches, fisher="exact").values()
    assert not model.training
    last = torch.cat(batches)[:, -1]  # (N, 6)
    p = torch.softmax(last @ model[0].weight.detach().T, -1)
    S_want = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
    A_want = last.T @ last / last.shape[0]
    torch.testing.assert_close(S @ S.T, S_want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A @ A.T, A_want, rtol=1e-10, atol=1e-12)

    dense = bayesian_lora.calculate_kronecker_factors(model, call, batches, None, 512, ["0"])
    assert model.training  # bayesian-lora calls model.train() and leaves it so
    torch.testing.assert_close(dense["0"][0], last.T @ last / len(batches))
    low_rank = bayesian_lora.calculate_kronecker_factors(model.eval(), call, batches, 6, 4, ["0"])
    root = low_rank["0"][0]
    torch.testing.assert_close(root @ root.T, last.T @ last)


def test_factor_errors_are_clear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).to(DTYPE)
    batches = [torch.randn(4, 6, dtype=DTYPE)]

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    with pytest.raises(ValueError, match="exclude_bias=True"):
        compat.calculate_kronecker_factors(model, call, batches)
    factors = compat.calculate_kronecker_factors(model, call, batches, exclude_bias=True)
    assert list(factors) == ["0"] and factors["0"][0].shape == (6, 6) and factors["0"][1].shape == (3, 3)
    with pytest.raises(ValueError, match="no nn.Linear"):
        compat.calculate_kronecker_factors(model, call, batches, target_module_keywords=["lora"])
    with pytest.raises(ValueError, match="empty"):
        compat.calculate_kronecker_factors(model, call, [], exclude_bias=True)
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        compat.calculate_kronecker_factors(model, lambda m, x: m(x)[None], batches, exclude_bias=True)
    with pytest.raises(ValueError, match="n_kfac"):
        compat.calculate_kronecker_factors(model, call, batches, 0, exclude_bias=True)
    with pytest.warns(RuntimeWarning, match="probabilities"):
        compat.calculate_kronecker_factors(model, lambda m, x: m(x).softmax(-1), batches, exclude_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.calculate_kronecker_factors(model, call, batches, exclude_bias=True)


# ------------------------------------------------------------------------------------ evidence


@pytest.mark.parametrize("s2", [1e-3, 0.05, 3.0])
def test_evidence_matches_dense_and_its_gradient_finite_differences(setup, s2: float) -> None:
    model, _, factors = setup
    LL = -7.25
    value = compat.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2)
    assert float(value) == pytest.approx(dense_log_evidence(model, factors, LL, s2), rel=1e-10)

    s2_tensor = torch.tensor([s2], dtype=DTYPE, requires_grad=True)  # bayesian-lora's Float[Tensor, "1"]
    out = compat.model_evidence(model, torch.tensor(LL, dtype=DTYPE), factors, N_LORA, N_KFAC, s2_tensor)
    assert out.shape == (1,)
    (grad,) = torch.autograd.grad(out.sum(), s2_tensor)
    h = 1e-6 * s2
    fd = (dense_log_evidence(model, factors, LL, s2 + h) - dense_log_evidence(model, factors, LL, s2 - h)) / (
        2 * h
    )
    assert float(grad) == pytest.approx(fd, rel=1e-6)


def test_bayesian_lora_evidence_differs_and_follows_the_documented_formula(setup) -> None:
    """bayesian_lora.model_evidence on the same inputs: its value is reproduced by the formula
    docs/compat.md gives, ``LL + (1/s2) sum ||W||_F + 1/2 (sum_l logdet M_l - r d_last log s2)``,
    and is far from the Laplace evidence."""
    model, batches, factors = setup
    LL = summed_log_likelihood(model, batches)
    s2 = torch.tensor(0.05, dtype=DTYPE)
    theirs = float(bayesian_lora.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2).detach())
    ours = float(compat.model_evidence(model, LL, factors, N_LORA, N_KFAC, s2))
    correct = dense_log_evidence(model, factors, float(LL), 0.05)
    assert ours == pytest.approx(correct, rel=1e-10)
    assert abs(theirs - correct) > 10.0

    norms = sum(torch.linalg.norm(p) for n, p in model.named_parameters() if "lora" in n and p.requires_grad)
    logdet_m = 0.0
    for A, S in factors.values():
        small, big = (A, S) if A.shape == (N_LORA, N_LORA) else (S, A)
        m = torch.eye(N_LORA * N_KFAC, dtype=DTYPE) + s2 * torch.kron(big.T @ big, small.T @ small)
        logdet_m += torch.linalg.slogdet(m).logabsdet
    d_last = max(*A.shape, *S.shape)
    formula = LL + norms / s2 + 0.5 * (logdet_m - N_LORA * d_last * torch.log(s2))
    assert theirs == pytest.approx(float(formula.detach()), rel=1e-10)
    # The correct value: the prior term is -|theta|^2/(2 s2) and the log-det term -1/2 sum logdet M.
    squared = sum(weight_of(model, k).square().sum() for k in factors)
    assert correct == pytest.approx(float(LL - squared / (2 * s2) - 0.5 * logdet_m), rel=1e-10)


def test_evidence_errors_are_clear(setup) -> None:
    model, _, factors = setup
    key, (A, S) = next(iter(factors.items()))
    with pytest.raises(ValueError, match="matches no parameter"):
        compat.model_evidence(model, 0.0, {"nope": (A, S)}, N_LORA, N_KFAC, 1.0)
    with pytest.raises(ValueError, match="rows"):
        compat.model_evidence(model, 0.0, {key: (S, A)}, N_LORA, N_KFAC, 1.0)
    with pytest.raises(ValueError, match="positive"):
        compat.model_evidence(model, 0.0, factors, N_LORA, N_KFAC, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="finite"):
        compat.model_evidence(model, float("nan"), factors, N_LORA, N_KFAC, 1.0)


# ------------------------------------------------------------------------------------ predictive


def test_jacobians_match_jacrev_and_bayesian_lora(setup) -> None:
    model, _, _ = setup
    batch = {k: v for k, v in padded_batch("llama", n=4, seed=5).items() if k != "labels"}
    params = flaplace.select_params(model, "lora")
    f = flaplace.ModelFunction(model, params, flaplace.LastTokenLogits(ANSWERS))
    with float64_rms_norm():
        reference = jacrev(f)(params, batch)
        ours, f_mu = compat.jacobian_mean(model, batch, list(ANSWERS))
        by_loop, _ = compat.jacobian_mean(model, BatchEncoding(batch), list(ANSWERS), method="loop")

        def callback(outputs):
            return outputs.logits[:, -1, list(ANSWERS)]

        theirs, their_mu = bayesian_lora.main.jacobian_mean(model, batch, output_callback=callback)
    assert set(ours) == set(reference) == set(theirs)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(by_loop[name], reference[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(theirs[name], reference[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f_mu, their_mu, rtol=1e-9, atol=1e-12)


def test_default_output_callback_works_where_bayesian_lora_raises(setup) -> None:
    model, _, _ = setup
    assert not hasattr(bayesian_lora, "jacobian_mean")  # not exported: main.__all__ omits it
    batch = {k: v for k, v in padded_batch("llama", n=3, seed=5).items() if k != "labels"}
    with pytest.raises(NameError, match="cfg"):
        bayesian_lora.main.jacobian_mean(model, batch, torch.tensor(ANSWERS))
    _, f_mu = compat.jacobian_mean(model, batch, torch.tensor(ANSWERS))
    torch.testing.assert_close(f_mu, tensor_fwd_call(model, batch).detach())
    _, all_logits = compat.jacobian_mean(model, batch)
    assert all_logits.shape == (3, 48)
    _, custom = compat.jacobian_mean(model, batch, output_callback=lambda out: out.logits[:, -1, :2])
    torch.testing.assert_close(custom, all_logits[:, :2])


def test_variance_matches_dense_and_bayesian_lora(setup) -> None:
    """compat.variance = J Sigma J^T (dense inverse); bayesian_lora.variance on the same factors
    agrees (its formula is right; it accumulates in float32)."""
    model, _, factors = setup
    batch = BatchEncoding({k: v for k, v in padded_batch("llama", n=4, seed=6).items() if k != "labels"})
    jacobian, _ = compat.jacobian_mean(model, batch, list(ANSWERS))
    for s2 in (1e-3, 0.3):
        s2_tensor = torch.tensor(s2, dtype=DTYPE)
        ours = compat.variance(batch, jacobian, factors, s2_tensor, N_CLASSES, N_LORA, N_KFAC, "cpu")
        torch.testing.assert_close(ours, dense_f_var(jacobian, factors, s2), rtol=1e-8, atol=1e-14)
        theirs = bayesian_lora.variance(batch, jacobian, factors, s2_tensor, N_CLASSES, N_LORA, N_KFAC, "cpu")
        assert theirs.dtype == torch.float32
        torch.testing.assert_close(theirs.to(DTYPE), ours, rtol=1e-4, atol=1e-6 * float(ours.abs().max()))

    one, _ = compat.jacobian_mean(model, {k: v[:1] for k, v in batch.items()}, list(ANSWERS))
    single = compat.variance(None, one, factors, 0.3, N_CLASSES, N_LORA, N_KFAC, "cpu")
    torch.testing.assert_close(single, dense_f_var(one, factors, 0.3), rtol=1e-8, atol=1e-14)
    one_input = BatchEncoding({k: v[:1] for k, v in batch.items()})
    with pytest.raises(AssertionError):  # bayesian-lora squeezes the batch dimension away
        bayesian_lora.variance(one_input, one, factors, torch.tensor(0.3), N_CLASSES, N_LORA, N_KFAC, "cpu")
    with pytest.raises(ValueError, match="n_logits"):
        compat.variance(batch, jacobian, factors, 0.3, 5, N_LORA, N_KFAC, "cpu")
    with pytest.raises(ValueError, match="examples"):
        compat.variance(
            {"input_ids": torch.zeros(2, 3)}, jacobian, factors, 0.3, N_CLASSES, N_LORA, N_KFAC, "cpu"
        )
    with pytest.raises(ValueError, match="matches no parameter"):
        compat.variance(batch, {}, factors, 0.3, N_CLASSES, N_LORA, N_KFAC, "cpu")


# ------------------------------------------------------------------------------------ Cholesky


def test_stable_cholesky() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, generator=g, dtype=DTYPE)
    spd = x @ x.mT + torch.eye(4, dtype=DTYPE)
    torch.testing.assert_close(compat.stable_cholesky(spd), torch.linalg.cholesky(spd), rtol=0, atol=0)

    singular = spd.clone()
    v = torch.randn(4, 1, generator=g, dtype=DTYPE)
    singular[1] = v @ v.T  # rank one: needs jitter; the other two must be left exact
    L = compat.stable_cholesky(singular)
    torch.testing.assert_close(L[0], torch.linalg.cholesky(spd[0]), rtol=0, atol=0)
    torch.testing.assert_close(L[2], torch.linalg.cholesky(spd[2]), rtol=0, atol=0)
    torch.testing.assert_close(L[1] @ L[1].T, singular[1], rtol=0, atol=1e-6)
    assert torch.equal(L, L.tril())

    with pytest.raises(ValueError, match="not positive definite"):
        compat.stable_cholesky(-torch.eye(3, dtype=DTYPE), max_tries=20)
    with pytest.raises(ValueError, match="non-finite"):
        compat.stable_cholesky(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="square"):
        compat.stable_cholesky(torch.zeros(2, 3))
