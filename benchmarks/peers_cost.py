"""Part 2 of benchmarks/compare_peers.py: time and peak memory of each library's stages."""

from __future__ import annotations

import copy
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from peers_common import (  # first: puts flaplace and tests/ on sys.path
    SEED,
    _bayesian_lora_factors,
    _bayesian_lora_predictive,
    _bayesian_lora_tune,
)
from tiny_models import LogitsModule, token_data  # noqa: E402
from tiny_models import peer_llama_lora as llama_lora  # noqa: E402

import flaplace  # noqa: E402
from flaplace.params import LastTokenLogits  # noqa: E402

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
            return flaplace.fit_kfac(model_fn, params, loader, progress=False, **options)

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
