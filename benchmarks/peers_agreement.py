"""Part 1 of benchmarks/compare_peers.py: flaplace against laplace-torch on a tiny float64 Llama with LoRA."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from peers_common import (  # first: puts flaplace and tests/ on sys.path
    SEED,
    fit_map,
    relative,
    scalar_relative,
)
from tiny_models import LogitsModule, float64_rms_norm, token_data  # noqa: E402
from tiny_models import peer_llama_lora as llama_lora  # noqa: E402
from torch import Tensor, nn

import flaplace  # noqa: E402
from flaplace.params import LastTokenLogits  # noqa: E402

# =============================================================================================
# Part 1: agreement with laplace-torch
# =============================================================================================


def _dense_factor(eigen: flaplace.Eigen) -> Tensor:
    return eigen.dense()


def _laplace_kron_as_factors(
    la: Any, names: Sequence[str], transposed: dict[str, Tensor]
) -> flaplace.Factors:
    """laplace-torch's summed Kronecker factors ``[B (out side), A (in side)]`` as flaplace eigen form."""
    kfacs = la.H_facs.kfacs
    if len(kfacs) != len(names):
        raise RuntimeError(f"laplace-torch has {len(kfacs)} Kronecker blocks for {len(names)} parameters")
    factors = {}
    for name, (gradient_factor, input_factor) in zip(names, kfacs, strict=True):
        s_values, s_vectors = torch.linalg.eigh(gradient_factor)
        a_values, a_vectors = torch.linalg.eigh(input_factor)
        factors[name] = flaplace.KronFactor(
            S=flaplace.Eigen(s_vectors, s_values),
            A=flaplace.Eigen(a_vectors, a_values),
            transposed=transposed[name],
        )
    return factors


def agreement(quick: bool = False, seed: int = SEED) -> dict[str, Any]:
    """Compare flaplace with laplace-torch's KronLaplace on one tiny float64 PEFT LoRA Llama.

    Returns a dict of relative differences (and the settings used); see docs/peers.md.
    """
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    torch.manual_seed(seed)
    n_train, length, n_classes, batch_size = (16, 8, 3, 8) if quick else (48, 16, 3, 8)
    hidden = 16 if quick else 32
    answers = [3, 5, 7]
    result: dict[str, Any] = {
        "settings": {
            "model": f"LlamaForCausalLM hidden={hidden}, 2 layers, vocab 64, PEFT LoRA r=4 on q_proj/v_proj",
            "dtype": "float64 (RMSNorm computed in float64)",
            "n_train": n_train,
            "sequence_length": length,
            "batch_size": batch_size,
            "classes": n_classes,
            "padding": "none (curvlinops ignores the attention mask)",
            "seed": seed,
            "laplace_backend": "CurvlinopsGGN (exact GGN); CurvlinopsEF; AsdlGGN",
        }
    }
    with float64_rms_norm():
        model, _ = llama_lora(hidden, vocab=64, rank=4, dtype=torch.float64, seed=seed)
        output_fn = LastTokenLogits(answers)
        params = flaplace.select_params(model, "lora")
        names = list(params)
        model_fn = flaplace.ModelFunction(model, params, output_fn)
        train = token_data(n_train, length, 64, n_classes, seed + 1)
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size)
        fit_map(
            model_fn, params, loader, steps=10 if quick else 40, lr=1e-2, prior_precision=1.0, n_data=n_train
        )
        wrapped = LogitsModule(model, output_fn)
        requires_grad = [n for n, p in model.named_parameters() if p.requires_grad]
        if [f"model.{n}" for n in names] != requires_grad and names != requires_grad:
            raise RuntimeError("laplace-torch's parameters (requires_grad) are not flaplace's selection")
        transposed = {n: torch.tensor(False) for n in names}

        factor_rows = {}
        evidence_rows = {}
        for sharing in ("expand", "reduce"):
            la = KronLaplace(
                wrapped,
                "classification",
                backend=CurvlinopsGGN,
                prior_precision=1.0,
                asdl_fisher_kwargs={"kfac_approx": sharing},
            )
            la.fit(loader)
            factors, state = flaplace.fit_kfac(
                model_fn,
                params,
                loader,
                fisher="exact",
                sharing=sharing,
                lr_threshold=None,
                progress=False,
            )
            s_err = max(
                relative(_dense_factor(factors[n].S), la.H_facs.kfacs[i][0]) for i, n in enumerate(names)
            )
            a_err = max(
                relative(_dense_factor(factors[n].A), la.H_facs.kfacs[i][1]) for i, n in enumerate(names)
            )
            factor_rows[f"ggn_{sharing}"] = {"S_max_rel": s_err, "A_max_rel": a_err}
            ll_err = scalar_relative(state.log_likelihood, la.log_likelihood)
            from_laplace = _laplace_kron_as_factors(la, names, transposed)
            per_prior = {}
            for label, prior in _priors(names, params):
                ours = flaplace.log_marginal_likelihood(
                    flaplace.make_posterior(factors, params, prior), state.log_likelihood
                )
                fed = flaplace.log_marginal_likelihood(
                    flaplace.make_posterior(from_laplace, params, prior), la.log_likelihood
                )
                theirs = la.log_marginal_likelihood(_laplace_prior(prior, names))
                per_prior[label] = {
                    "flaplace": float(ours),
                    "laplace_torch": float(theirs),
                    "rel_own_factors": scalar_relative(ours, theirs),
                    "rel_laplace_factors": scalar_relative(fed, theirs),
                }
            evidence_rows[f"ggn_{sharing}"] = {"log_likelihood_rel": ll_err, "priors": per_prior}
            if sharing == "expand":
                expand_la, expand_factors, expand_state = la, factors, state
        result["factors"] = factor_rows
        result["evidence"] = evidence_rows

        # Empirical Fisher: deterministic, so it must agree too.
        la_ef = KronLaplace(wrapped, "classification", backend=CurvlinopsEF, prior_precision=1.0)
        la_ef.fit(loader)
        ef_factors, _ = flaplace.fit_kfac(
            model_fn, params, loader, fisher="empirical", sharing="expand", lr_threshold=None, progress=False
        )
        result["factors"]["empirical_expand"] = {
            "S_max_rel": max(
                relative(_dense_factor(ef_factors[n].S), la_ef.H_facs.kfacs[i][0])
                for i, n in enumerate(names)
            ),
            "A_max_rel": max(
                relative(_dense_factor(ef_factors[n].A), la_ef.H_facs.kfacs[i][1])
                for i, n in enumerate(names)
            ),
        }

        # ASDL: same S, but its A sums over positions instead of averaging (T times larger).
        result["asdl"] = _asdl_agreement(wrapped, loader, names, expand_factors, expand_state, params, length)

        # Linearised predictive on held-out inputs.
        test = token_data(batch_size, length, 64, n_classes, seed + 2)
        batch = torch.utils.data.default_collate(list(test))
        prior = 0.7
        expand_la.prior_precision = prior
        jacobians_la, f_mu_la = expand_la.backend.jacobians(batch)
        f_var_la = expand_la.functional_variance(jacobians_la)
        posterior = flaplace.make_posterior(expand_factors, params, prior)
        predictive = {}
        for method in ("capture", "loop"):
            f_mu, f_var = flaplace.linearised_predictive(model_fn, posterior, batch, method=method)
            predictive[method] = {"f_mu_rel": relative(f_mu, f_mu_la), "f_var_rel": relative(f_var, f_var_la)}
        # The same covariance from laplace-torch's own factors.
        fed_posterior = flaplace.make_posterior(
            _laplace_kron_as_factors(expand_la, names, transposed), params, prior
        )
        _, f_var_fed = flaplace.linearised_predictive(model_fn, fed_posterior, batch, method="capture")
        predictive["capture_laplace_factors"] = {"f_var_rel": relative(f_var_fed, f_var_la)}
        probs_la = expand_la(batch, pred_type="glm", link_approx="probit")
        f_mu, f_var = flaplace.linearised_predictive(model_fn, posterior, batch, method="capture")
        # laplace-torch's probit scales each class by its own raw variance, softmax(f_mu * kappa),
        # kappa = (1 + pi/8 diag f_var)^(-1/2); flaplace's probit is the shift-invariant mean-field
        # form (docs/predictive.md). The agreement compares the same formula on both libraries'
        # moments; the difference of the two links is recorded on its own.
        kappa = torch.rsqrt(1 + math.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
        predictive["probit_probs_rel"] = relative(torch.softmax(kappa * f_mu, -1), probs_la)
        predictive["probit_link_difference_rel"] = relative(flaplace.predictive_probs(f_mu, f_var), probs_la)
        predictive["prior_precision"] = prior
        result["predictive"] = predictive

        result["prior_tuning"] = _tuning_agreement(expand_la, expand_factors, expand_state, params)
    result["max_rel"] = _max_relative(result)
    return result


def _priors(names: Sequence[str], params: dict[str, Tensor]) -> list[tuple[str, Any]]:
    generator = torch.Generator().manual_seed(5)
    per_block = {
        n: float(v) for n, v in zip(names, torch.rand(len(names), generator=generator) * 5 + 0.1, strict=True)
    }
    return [("scalar_0.1", 0.1), ("scalar_1", 1.0), ("scalar_10", 10.0), ("per_block", per_block)]


def _laplace_prior(prior: Any, names: Sequence[str]) -> Tensor:
    """A flaplace prior (float or ``{name: value}``) as laplace-torch's scalar or per-layer tensor."""
    if isinstance(prior, dict):
        return torch.tensor([prior[n] for n in names], dtype=torch.float64)
    return torch.tensor(prior, dtype=torch.float64)


def _asdl_agreement(
    wrapped: nn.Module,
    loader: torch.utils.data.DataLoader,
    names: Sequence[str],
    factors: flaplace.Factors,
    state: Any,
    params: dict[str, Tensor],
    length: int,
) -> dict[str, Any]:
    from laplace import KronLaplace

    try:
        from laplace.curvature import AsdlGGN
    except ImportError as error:  # pragma: no cover - depends on the environment
        return {"error": f"AsdlGGN unavailable: {error}"}
    try:
        la = KronLaplace(wrapped, "classification", backend=AsdlGGN, prior_precision=1.0)
        la.fit(loader)
    except Exception as error:  # noqa: BLE001 - any backend failure is a result to report
        return {"error": f"{type(error).__name__}: {error}"}
    s_err = max(relative(_dense_factor(factors[n].S), la.H_facs.kfacs[i][0]) for i, n in enumerate(names))
    ratios = [
        float(la.H_facs.kfacs[i][1].trace() / _dense_factor(factors[n].A).trace())
        for i, n in enumerate(names)
    ]
    a_err_scaled = max(
        relative(la.H_facs.kfacs[i][1] / length, _dense_factor(factors[n].A)) for i, n in enumerate(names)
    )
    scaled = {n: f._replace(A=flaplace.Eigen(f.A.vectors, f.A.values * length)) for n, f in factors.items()}
    ours = flaplace.log_marginal_likelihood(
        flaplace.make_posterior(scaled, params, 1.0), state.log_likelihood
    )
    theirs = la.log_marginal_likelihood(torch.tensor(1.0, dtype=torch.float64))
    return {
        "S_max_rel": s_err,
        "A_ratio_to_flaplace": ratios,
        "A_over_T_max_rel": a_err_scaled,
        "sequence_length": length,
        "evidence_rel_with_A_times_T": scalar_relative(ours, theirs),
    }


def _tuning_agreement(
    la: Any, factors: flaplace.Factors, state: Any, params: dict[str, Tensor]
) -> dict[str, Any]:
    """Evidence-tuned scalar prior precision: laplace-torch (100 Adam steps) vs flaplace (to tolerance)."""
    posterior = flaplace.make_posterior(factors, params, 1.0)
    tuned, history = flaplace.tune_prior_evidence(
        posterior, state.log_likelihood, progress=False, tol=1e-8, steps=3000
    )
    ours = float(next(iter(tuned.prior_precision.values())))
    la.optimize_prior_precision(
        pred_type="glm", method="marglik", n_steps=100, lr=0.1, prior_structure="scalar"
    )
    theirs = float(la.prior_precision.reshape(-1)[0])
    la.optimize_prior_precision(
        pred_type="glm", method="marglik", n_steps=2000, lr=0.1, prior_structure="scalar"
    )
    theirs_long = float(la.prior_precision.reshape(-1)[0])
    from flaplace.evidence import evidence_gradient

    def gradient_at(value: float) -> float:
        return sum(
            evidence_gradient(flaplace.with_prior_precision(posterior, value), state.log_likelihood).values()
        )

    return {
        "flaplace": ours,
        "flaplace_steps": history[-1]["step"],
        "dlogZ_dloglambda_flaplace": gradient_at(ours),
        "dlogZ_dloglambda_laplace_torch_100_steps": gradient_at(theirs),
        "dlogZ_dloglambda_laplace_torch_2000_steps": gradient_at(theirs_long),
        "laplace_torch_100_steps": theirs,
        "laplace_torch_2000_steps": theirs_long,
        "rel_100_steps": scalar_relative(ours, theirs),
        "rel_2000_steps": scalar_relative(ours, theirs_long),
        "log_evidence_flaplace": history[-1]["log_evidence"],
    }


def _max_relative(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers: the largest relative difference of each kind."""
    return {
        "factors": max(max(row.values()) for row in result["factors"].values()),
        "evidence_own_factors": max(
            p["rel_own_factors"] for row in result["evidence"].values() for p in row["priors"].values()
        ),
        "evidence_laplace_factors": max(
            p["rel_laplace_factors"] for row in result["evidence"].values() for p in row["priors"].values()
        ),
        "log_likelihood": max(row["log_likelihood_rel"] for row in result["evidence"].values()),
        "f_var": max(v["f_var_rel"] for k, v in result["predictive"].items() if isinstance(v, dict)),
        "f_mu": max(
            v["f_mu_rel"] for k, v in result["predictive"].items() if isinstance(v, dict) and "f_mu_rel" in v
        ),
        "probit_probs": result["predictive"]["probit_probs_rel"],
    }
