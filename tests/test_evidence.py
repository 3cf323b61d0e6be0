"""Evidence and prior tuning against dense references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from flaplace.evidence import (
    evidence_gradient,
    log_marginal_likelihood,
    tune_prior_evidence,
    tune_prior_grid,
)
from flaplace.posterior import make_posterior, with_prior_precision
from flaplace.typing import Eigen, KronFactor

DTYPE = torch.float64
LL = -123.25


def random_eigen(side: int, rank: int | None, generator: torch.Generator, scale: float = 1.0) -> Eigen:
    """A random PSD matrix of side ``side`` in eigen form; ``rank`` keeps only the top eigenpairs (thin)."""
    x = torch.randn(side, side + 2, generator=generator, dtype=DTYPE)
    values, vectors = torch.linalg.eigh(scale * x @ x.T / side)
    if rank is not None:
        values, vectors = values[-rank:], vectors[:, -rank:]
    return Eigen(vectors, values)


def dense(eigen: Eigen) -> torch.Tensor:
    """``Q diag(v) Q^T``: for a thin factor, the truncated reconstruction."""
    return eigen.dense()


def make_blocks(generator: torch.Generator, thin: bool):
    """Three blocks, one of them transposed (stored (i, o)), as (factors, params)."""
    shapes = {"l0.lora_A.weight": (2, 5), "l0.lora_B.weight": (5, 2), "c_attn.weight": (3, 4)}
    transposed = {"c_attn.weight"}
    factors, params = {}, {}
    for name, (o, i) in shapes.items():
        rank_s = o - 1 if thin and o > 2 else None
        rank_a = i - 2 if thin and i > 2 else None
        factors[name] = KronFactor(
            S=random_eigen(o, rank_s, generator, scale=4.0),
            A=random_eigen(i, rank_a, generator),
            transposed=torch.tensor(name in transposed),
        )
        stored = (i, o) if name in transposed else (o, i)
        params[name] = torch.randn(stored, generator=generator, dtype=DTYPE)
    return factors, params


def dense_log_evidence(factors, params, lam: dict[str, float], ll: float) -> float:
    """``LL - 1/2 theta^T P0 theta - 1/2 (logdet P - logdet P0)`` with the whole P materialised."""
    kron_blocks, prior_diag, theta = [], [], []
    for name, factor in factors.items():
        w = params[name].T if bool(factor.transposed) else params[name]  # (o, i)
        kron = torch.kron(dense(factor.S), dense(factor.A))
        kron_blocks.append(kron)
        prior_diag.append(torch.full((kron.shape[0],), lam[name], dtype=DTYPE))
        theta.append(w.reshape(-1))
    p0 = torch.diag(torch.cat(prior_diag))
    p = torch.block_diag(*kron_blocks) + p0
    th = torch.cat(theta)
    logdet_p = torch.linalg.slogdet(p)
    logdet_p0 = torch.linalg.slogdet(p0)
    assert logdet_p.sign > 0 and logdet_p0.sign > 0
    return float(ll - 0.5 * th @ p0 @ th - 0.5 * (logdet_p.logabsdet - logdet_p0.logabsdet))


@pytest.mark.parametrize("thin", [False, True])
def test_evidence_matches_dense_scalar_prior(rng, thin):
    factors, params = make_blocks(rng, thin)
    posterior = make_posterior(factors, params, 0.7)
    got = float(log_marginal_likelihood(posterior, LL))
    want = dense_log_evidence(factors, params, dict.fromkeys(params, 0.7), LL)
    assert got == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("thin", [False, True])
def test_evidence_matches_dense_per_block_prior(rng, thin):
    factors, params = make_blocks(rng, thin)
    prior = {"lora_a": 0.3, "lora_B": 2.5, "c_attn.weight": 11.0}
    posterior = make_posterior(factors, params, prior)
    got = float(log_marginal_likelihood(posterior, torch.tensor(LL)))
    lam = {"l0.lora_A.weight": 0.3, "l0.lora_B.weight": 2.5, "c_attn.weight": 11.0}
    want = dense_log_evidence(factors, params, lam, LL)
    assert got == pytest.approx(want, rel=1e-8)


def test_evidence_clamps_round_off_negative_eigenvalues(rng):
    factors, params = make_blocks(rng, thin=False)
    name = "l0.lora_B.weight"
    s = factors[name].S
    negative = s.values.clone()
    negative[0] = -1e-14
    factors_neg = dict(factors)
    factors_neg[name] = factors[name]._replace(S=Eigen(s.vectors, negative))
    factors_zero = dict(factors)
    zero = negative.clone()
    zero[0] = 0.0
    factors_zero[name] = factors[name]._replace(S=Eigen(s.vectors, zero))
    a = log_marginal_likelihood(make_posterior(factors_neg, params, 1e-13), LL)
    b = log_marginal_likelihood(make_posterior(factors_zero, params, 1e-13), LL)
    assert torch.isfinite(a) and float(a) == float(b)


@pytest.fixture(scope="module")
def tiny_lora_llama():
    """A random Llama (hidden 32, 2 layers, 2 heads, vocab 64) with PEFT LoRA r=8 on q_proj, v_proj.

    r=8 gives 2 layers x 2 modules x (8x32 + 32x8) = 2048 adapter parameters.
    """
    peft = pytest.importorskip("peft")
    from tiny_models import tiny_base_model

    torch.manual_seed(0)
    base = tiny_base_model("llama", hidden=32, vocab=64, attn_implementation="eager")
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, lora).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero; a MAP would not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return model


PRIORS = [
    (0.8, lambda names: dict.fromkeys(names, 0.8)),
    ({"lora_A": 2.0, "lora_B": 0.5}, lambda names: {n: 2.0 if "lora_A" in n else 0.5 for n in names}),
]


@pytest.mark.parametrize("thin", [False, True])
def test_evidence_on_tiny_peft_lora_llama_random_factors(tiny_lora_llama, thin):
    """Random PSD factors of the LoRA shapes; thin (rank 5) on the sides of size 32."""
    from flaplace.params import select_params

    gen = torch.Generator().manual_seed(4)
    params = select_params(tiny_lora_llama, "lora")
    assert len(params) == 8 and sum(p.numel() for p in params.values()) == 2048
    factors = {}
    for name, p in params.items():
        o, i = p.shape
        factors[name] = KronFactor(
            S=random_eigen(o, 5 if thin and o >= 16 else None, gen, scale=50.0),
            A=random_eigen(i, 5 if thin and i >= 16 else None, gen),
            transposed=torch.tensor(False),
        )
    for prior, lam in PRIORS:
        posterior = make_posterior(factors, params, prior)
        got = float(log_marginal_likelihood(posterior, -500.0))
        want = dense_log_evidence(factors, params, lam(params), -500.0)
        assert got == pytest.approx(want, rel=1e-8), prior


@pytest.mark.parametrize("lr_threshold", [None, 16])
def test_evidence_on_tiny_peft_lora_llama_fitted_kfac(tiny_lora_llama, lr_threshold):
    """The same identity with the K-FAC factors and log-likelihood of flaplace.kfac (thin when 16)."""
    kfac = pytest.importorskip("flaplace.kfac")
    from flaplace.params import LastTokenLogits, ModelFunction, select_params

    gen = torch.Generator().manual_seed(5)
    params = select_params(tiny_lora_llama, "lora")
    model_fn = ModelFunction(tiny_lora_llama, params, LastTokenLogits([3, 7]))
    batches = [
        {
            "input_ids": torch.randint(0, 64, (4, 6), generator=gen),
            "labels": torch.randint(0, 2, (4,), generator=gen),
        }
        for _ in range(3)
    ]
    factors, state = kfac.fit(
        model_fn,
        params,
        batches,
        fisher="exact",
        lr_threshold=lr_threshold,
        n_kfac=5,
        progress=False,
    )
    if lr_threshold is not None:
        assert any(f.S.vectors.shape[1] < f.S.vectors.shape[0] for f in factors.values())
    ll = float(state.log_likelihood)
    for prior, lam in PRIORS:
        posterior = make_posterior(factors, params, prior)
        got = float(log_marginal_likelihood(posterior, state.log_likelihood))
        want = dense_log_evidence(factors, params, lam(params), ll)
        assert got == pytest.approx(want, rel=1e-8), prior


def central_difference(fn, x: float, h: float = 1e-5) -> float:
    return (fn(x + h) - fn(x - h)) / (2 * h)


@pytest.mark.parametrize("thin", [False, True])
def test_gradient_in_log_scalar_prior_matches_finite_differences(rng, thin):
    factors, params = make_blocks(rng, thin)
    posterior = make_posterior(factors, params, 1.0)
    log_lam = torch.tensor(math.log(0.05), dtype=DTYPE, requires_grad=True)
    log_z = log_marginal_likelihood(with_prior_precision(posterior, log_lam.exp()), LL)
    (grad,) = torch.autograd.grad(log_z, log_lam)

    def evidence(t: float) -> float:
        return dense_log_evidence(factors, params, dict.fromkeys(params, math.exp(t)), LL)

    want = central_difference(evidence, math.log(0.05))
    assert abs(want) > 1.0  # not at a stationary point, so the check has teeth
    assert float(grad) == pytest.approx(want, rel=1e-6)


def test_gradient_in_log_per_block_prior_matches_finite_differences(rng):
    factors, params = make_blocks(rng, thin=True)
    base = {"l0.lora_A.weight": 0.4, "l0.lora_B.weight": 3.0, "c_attn.weight": 0.05}
    posterior = make_posterior(factors, params, base)
    grads = evidence_gradient(posterior, LL)
    for name in params:

        def evidence(t: float, name: str = name) -> float:
            lam = dict(base)
            lam[name] = math.exp(t)
            return dense_log_evidence(factors, params, lam, LL)

        want = central_difference(evidence, math.log(base[name]))
        assert grads[name] == pytest.approx(want, rel=1e-6), name


def stationary_prior_precision(factors, params, names) -> float:
    """Root of ``d log Z / d lambda = 0`` for one shared lambda, from the dense eigenvalues.

    ``log Z(lambda) = -lambda c / 2 - 1/2 sum_k log(1 + e_k / lambda)``: the root solves
    ``lambda c = sum_k e_k / (lambda + e_k)``, increasing minus decreasing in lambda, so
    bisection in log lambda finds the unique maximiser.
    """
    c = sum(float(params[n].square().sum()) for n in names)
    eigs = torch.cat(
        [
            torch.linalg.eigvalsh(torch.kron(dense(factors[n].S), dense(factors[n].A))).clamp(min=0)
            for n in names
        ]
    )

    def h(log_lam: float) -> float:
        lam = math.exp(log_lam)
        return lam * c - float((eigs / (lam + eigs)).sum())

    lo, hi = -30.0, 30.0
    assert h(lo) < 0 < h(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if h(mid) < 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


@pytest.mark.parametrize("start", [1e-4, 50.0, 1e4])
def test_tune_prior_evidence_scalar_reaches_the_optimum(rng, start):
    factors, params = make_blocks(rng, thin=True)
    posterior = make_posterior(factors, params, start)
    tuned, history = tune_prior_evidence(posterior, LL, progress=False, tol=1e-9)
    assert history[-1]["grad_norm"] < 1e-9 * 32  # tol is per weight; 32 weights
    assert len(history) < 1000  # it stopped at the stationary point, not at the step limit
    assert history[-1]["log_evidence"] > history[0]["log_evidence"] + 1.0
    lam = {float(v) for v in tuned.prior_precision.values()}
    assert len(lam) == 1
    (value,) = lam
    optimum = stationary_prior_precision(factors, params, list(params))
    assert value == pytest.approx(optimum, rel=1e-5)
    # the dense evidence on a fine grid of log lambda around the optimum is never higher
    tuned_dense = dense_log_evidence(factors, params, dict.fromkeys(params, value), LL)
    for t in torch.linspace(math.log(optimum) - 3, math.log(optimum) + 3, 601).tolist():
        assert (
            dense_log_evidence(factors, params, dict.fromkeys(params, math.exp(t)), LL) <= tuned_dense + 1e-9
        )
    assert history[-1]["log_evidence"] == pytest.approx(tuned_dense, rel=1e-10)


def test_tune_prior_evidence_per_block_and_groups(rng):
    factors, params = make_blocks(rng, thin=False)
    posterior = make_posterior(factors, params, 1.0)
    tuned, history = tune_prior_evidence(posterior, LL, per_block=True, progress=False, tol=1e-9)
    assert history[-1]["log_evidence"] > history[0]["log_evidence"]
    for name, grad in evidence_gradient(tuned, LL).items():
        assert abs(grad) < 32e-9
        # blocks are independent given their own lambda: each hits its own 1-D optimum
        assert float(tuned.prior_precision[name]) == pytest.approx(
            stationary_prior_precision(factors, params, [name]), rel=1e-5
        )
    grouped, _ = tune_prior_evidence(
        posterior,
        LL,
        per_block=["lora", "c_attn"],
        progress=False,
        tol=1e-6,
        init={"lora": 0.1, "c_attn": 5.0},
    )
    lora = ["l0.lora_A.weight", "l0.lora_B.weight"]
    assert float(grouped.prior_precision[lora[0]]) == float(grouped.prior_precision[lora[1]])
    assert float(grouped.prior_precision[lora[0]]) == pytest.approx(
        stationary_prior_precision(factors, params, lora), rel=1e-5
    )
    assert float(grouped.prior_precision["c_attn.weight"]) == pytest.approx(
        stationary_prior_precision(factors, params, ["c_attn.weight"]), rel=1e-5
    )


def test_tune_prior_evidence_warns_when_steps_run_out(rng):
    factors, params = make_blocks(rng, thin=False)
    posterior = make_posterior(factors, params, 1e-3)
    with pytest.warns(RuntimeWarning, match="still above"):
        _, history = tune_prior_evidence(posterior, LL, steps=3, progress=False)
    assert len(history) == 4


def test_tune_prior_grid_picks_the_lowest_validation_nll(rng):
    factors, params = make_blocks(rng, thin=True)
    posterior = make_posterior(factors, params, 1.0)

    def nll_fn(candidate) -> float:
        lam = float(next(iter(candidate.prior_precision.values())))
        return math.nan if lam > 50 else (math.log(lam) - math.log(3.0)) ** 2

    tuned, table = tune_prior_grid(posterior, nll_fn, grid=[0.1, 1.0, 2.5, 10.0, 100.0], progress=False)
    assert [row["prior_precision"] for row in table] == [0.1, 1.0, 2.5, 10.0, 100.0]
    assert math.isnan(table[-1]["nll"])
    assert all(float(v) == 2.5 for v in tuned.prior_precision.values())
    tuned_default, table_default = tune_prior_grid(posterior, nll_fn, progress=False)
    assert len(table_default) == 33
    assert float(next(iter(tuned_default.prior_precision.values()))) == pytest.approx(10 ** (2 / 4))
    with pytest.raises(ValueError, match="empty"):
        tune_prior_grid(posterior, nll_fn, grid=[], progress=False)
    with pytest.raises(ValueError, match="positive"):
        tune_prior_grid(posterior, nll_fn, grid=[1.0, -2.0], progress=False)
    with pytest.raises(ValueError, match="finite NLL"):
        tune_prior_grid(posterior, lambda candidate: math.inf, grid=[1.0], progress=False)


def test_log_likelihood_must_be_finite(rng):
    factors, params = make_blocks(rng, thin=True)
    posterior = make_posterior(factors, params, 1.0)
    with pytest.raises(ValueError, match="finite"):
        log_marginal_likelihood(posterior, math.nan)
