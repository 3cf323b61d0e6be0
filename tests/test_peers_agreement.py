"""flaplace against laplace-torch's KronLaplace on the same tiny float64 PEFT LoRA model.

laplace-torch (curvlinops backend) is an independent implementation of K-FAC, the Laplace
evidence and the GLM predictive; with the same conventions (exact GGN, expand, S summed and A
averaged, one prior precision per block) both must agree to float64 round-off. Skipped when
laplace-torch is not installed (it is a ``bench`` dependency). The full comparison, with more
settings, is ``python benchmarks/compare_peers.py --part agreement`` (docs/peers.md).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("laplace")
pytest.importorskip("curvlinops")

import tiny_models  # noqa: E402

import flaplace  # noqa: E402
from flaplace.params import LastTokenLogits  # noqa: E402

TOL = 1e-10


@pytest.fixture(scope="module")
def fitted():
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN

    with tiny_models.float64_rms_norm():
        model, _ = tiny_models.peer_llama_lora(16, vocab=32, rank=2, dtype=torch.float64, seed=0)
        output_fn = LastTokenLogits([3, 5, 7])
        params = flaplace.select_params(model, "lora")
        model_fn = flaplace.ModelFunction(model, params, output_fn)
        loader = torch.utils.data.DataLoader(tiny_models.token_data(10, 6, 32, 3, seed=1), batch_size=4)
        la = KronLaplace(tiny_models.LogitsModule(model, output_fn), "classification", backend=CurvlinopsGGN)
        la.fit(loader)
        factors, state = flaplace.fit_kfac(
            model_fn, params, loader, fisher="exact", sharing="expand", lr_threshold=None,
            progress=False,
        )  # fmt: skip
        batch = torch.utils.data.default_collate(list(tiny_models.token_data(3, 6, 32, 3, seed=2)))
        yield {"la": la, "factors": factors, "state": state, "params": params, "model_fn": model_fn,
               "batch": batch}  # fmt: skip


def _dense(eigen: flaplace.Eigen) -> torch.Tensor:
    return eigen.dense()


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def test_kronecker_factors_equal_laplace_torch(fitted):
    names = list(fitted["params"])
    kfacs = fitted["la"].H_facs.kfacs
    assert len(kfacs) == len(names)  # one block per LoRA matrix, in the same order
    for (gradient_factor, input_factor), name in zip(kfacs, names, strict=True):
        assert _rel(_dense(fitted["factors"][name].S), gradient_factor) < TOL
        assert _rel(_dense(fitted["factors"][name].A), input_factor) < TOL


@pytest.mark.parametrize("kind", ["scalar", "per_block"])
def test_log_marginal_likelihood_equals_laplace_torch(fitted, kind):
    names = list(fitted["params"])
    if kind == "scalar":
        ours_prior, theirs_prior = 0.3, torch.tensor(0.3, dtype=torch.float64)
    else:
        values = torch.linspace(0.2, 4.0, len(names), dtype=torch.float64)
        ours_prior = {n: float(v) for n, v in zip(names, values, strict=True)}
        theirs_prior = values
    posterior = flaplace.make_posterior(fitted["factors"], fitted["params"], ours_prior)
    ours = flaplace.log_marginal_likelihood(posterior, fitted["state"].log_likelihood)
    theirs = fitted["la"].log_marginal_likelihood(theirs_prior)
    assert abs(float(fitted["state"].log_likelihood) - float(fitted["la"].log_likelihood)) < 1e-12
    assert abs(float(ours) - float(theirs)) < TOL * abs(float(theirs))


def test_predictive_covariance_equals_laplace_torch(fitted):
    la = fitted["la"]
    la.prior_precision = 0.7
    jacobians, f_mu_theirs = la.backend.jacobians(fitted["batch"])
    f_var_theirs = la.functional_variance(jacobians)
    posterior = flaplace.make_posterior(fitted["factors"], fitted["params"], 0.7)
    f_mu, f_var = flaplace.linearised_predictive(
        fitted["model_fn"], posterior, fitted["batch"], method="capture"
    )
    assert _rel(f_mu, f_mu_theirs) < TOL
    assert _rel(f_var, f_var_theirs) < TOL
