"""Laplace-LoRA at LLM scale: Llama-7B-shaped layers, bf16 base weights, float32 LoRA.

Each config is a random ``LlamaForCausalLM`` with Llama-7B's layer shapes (hidden 4096,
intermediate 11008, 32 heads, vocabulary 32000) but only 2 decoder layers, its weights in
bfloat16, with PEFT LoRA adapters (r=8, alpha 16, float32 as PEFT keeps them) on ``q_proj`` and
``v_proj`` (``qv``) or on every linear layer of the blocks (``all``). The output is the
last-position logits of 4 answer tokens. Stages and methods (all timed in the same process,
interleaved, so that their ratios come from one run):

* ``forward_backward``: a plain ``loss.backward()`` to the LoRA weights (last position's logits
  only and no key/value cache, as flaplace asks for): the yardstick.
* ``kfac_lowrank``: the factors of one batch with bayesian-lora's settings (one Monte Carlo sample,
  last position, ``n_kfac=10``, ``lr_threshold=100``): flaplace's ``update`` + ``kfac_factors``
  (eager and ``torch.compile``-d), bayesian-lora's ``calculate_kronecker_factors`` +
  ``cholesky_decompose_small_factors`` called as its README does (its forward projects every
  position onto the vocabulary and keeps the last), and the same with a forward that keeps the
  last position's logits only and no key/value cache (variant ``.../trimmed``: the same model
  work as flaplace).
* ``kfac_dense``: dense factors of one batch (one Monte Carlo sample, every position,
  ``sharing="expand"``): flaplace's ``update``; laplace-torch's ``CurvlinopsGGN(stochastic).kron``
  (the curvature of ``KronLaplace.fit`` without its eigendecomposition). The eigendecompositions
  of dense 4096 x 4096 factors (10-15 s each on one core) are a once-per-fit cost, reported once
  as ``decompose_s`` rather than timed in every round.
* ``evidence``: one log marginal likelihood at a given prior; ``prior_tuning``: each library's own
  marginal-likelihood tuning with its defaults (flaplace ``tune_prior_evidence``; bayesian-lora
  200 AdamW steps, as its example; laplace-torch 100 steps of ``optimize_prior_precision``);
  ``predictive``: the linearised predictive of one batch (Jacobians of the answer logits and
  their covariance; flaplace's and laplace-torch's probit probabilities), the posterior's
  precomputation outside the timed call. flaplace and bayesian-lora use their low-rank posteriors,
  laplace-torch its dense Kronecker one.

Times: medians over interleaved rounds (``_common.interleaved``), after one untimed call of each case
whose code the setup has not run yet (compilation, one-time allocations). Peak
memory: on CPU a second worker process with ``_common.MEMORY_ENV`` calls every case once untimed
and once measured (resident-set rise); on CUDA the allocator's peak over the timed calls.

    python benchmarks/scale.py                      # CPU: hidden 4096 (q/v, all-linear) and 1024, seq 256
    python benchmarks/scale.py --quick              # hidden 128, a smoke test; writes /tmp, leaves the docs
    python benchmarks/scale.py --device cuda        # a GPU: adds seq 1024 and batch 4 configs
    bash scripts/scale_gpu.sh                       # the same on a GPU machine, wheels and output included
    python benchmarks/scale.py --merge FILE         # add another run's records (e.g. a GPU's) to scale.json

On an idle 2-core machine the CPU default should take about 30 minutes per hidden-4096 config (an estimate: one torch
thread; the compile of the update alone takes about 2 minutes). ``--stages`` restricts the stages
(``forward_backward`` is always measured, as the yardstick of the run), ``--no-trimmed`` drops the
bayesian-lora variant with the trimmed forward, ``--concurrent-memory`` runs the memory worker beside
the timing worker (for a crowded machine: a resident-set rise does not depend on the CPU share), and
``--run LABEL`` tags the records, so that runs of different stages can be merged into one file
(``x fwd+bwd`` always divides by the yardstick of the same run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import torch
import torch.nn.functional as F
from scale_common import STAGES, compile_case, docs_markdown, done_when, merge, ratios

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = common.RESULTS / "scale.json"
QUICK_OUTPUT = Path("/tmp/flaplace_scale.quick.json")
METHODS = ("flaplace", "bayesian-lora", "laplace-torch", "forward+backward")
LOWRANK = {"n_kfac": 10, "lr_threshold": 100}  # bayesian-lora's README settings
LORA_RANK = 8
LORA_TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass(frozen=True)
class Config:
    """One measured model and batch."""

    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    vocab: int = 32000
    layers: int = 2
    seq: int = 256
    batch: int = 2
    lora: str = "qv"
    stages: tuple[str, ...] = STAGES
    laplace_torch: bool = True  # laplace-torch's KronLaplace (dense factors; its fit eigendecomposes them)
    compiled: tuple[str, ...] = ("kfac_lowrank", "evidence", "predictive")  # stages with a compiled case
    repeats: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


_SEVEN_B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000}
_TINY = {"hidden": 128, "intermediate": 344, "heads": 2, "vocab": 512, "seq": 16}

#: CPU configs (the default on CPU), then the ones a GPU adds.
CONFIGS: dict[str, Config] = {
    "h4096-qv-s256-b2": Config(**_SEVEN_B, seq=256, batch=2, lora="qv"),
    "h4096-all-s256-b2": Config(
        **_SEVEN_B,
        seq=256,
        batch=2,
        lora="all",
        # dense factors of side 11008 (gate/up/down): about 1 TFLOP of products per batch on one
        # core and 3 GB of state, and laplace-torch's fit would eigendecompose them: CPU skips them
        stages=tuple(s for s in STAGES if s != "kfac_dense"),
        laplace_torch=False,
        compiled=(),
    ),
    "h4096-qv-s1024-b4": Config(**_SEVEN_B, seq=1024, batch=4, lora="qv"),
    "h4096-all-s1024-b4": Config(**_SEVEN_B, seq=1024, batch=4, lora="all", laplace_torch=False),
}
CONFIGS["h1024-qv-s256-b2"] = Config(  # Llama-7B's ratios at a quarter of its width: every stage, cheaply
    hidden=1024, intermediate=2752, heads=8, vocab=32000, seq=256, batch=2, lora="qv"
)
CPU_DEFAULT = ("h4096-qv-s256-b2", "h4096-all-s256-b2", "h1024-qv-s256-b2")
QUICK: dict[str, Config] = {
    "quick-qv": Config(**_TINY, batch=2, lora="qv", repeats=1),
    "quick-all": Config(**_TINY, batch=2, lora="all", laplace_torch=False, compiled=(), repeats=1),
}


def all_configs() -> dict[str, Config]:
    return {**CONFIGS, **QUICK}


# ------------------------------------------------------------------------------------------------
# Model, batch and the cases of one config
# ------------------------------------------------------------------------------------------------


def build_model(config: Config, device: str, seed: int = 0) -> torch.nn.Module:
    """Random Llama with ``config``'s shapes, bf16 weights, float32 PEFT LoRA (``lora_B`` ~ N(0, 0.02^2))."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_config = LlamaConfig(
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        vocab_size=config.vocab,
        max_position_embeddings=max(2048, config.seq),
    )
    with torch.device(device):
        base = LlamaForCausalLM._from_config(hf_config, torch_dtype=torch.bfloat16)
    lora = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS[config.lora]
    )
    model = peft.get_peft_model(base, lora)  # adapters in float32 (PEFT's autocast_adapter_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT's zeros would make every lora_A gradient zero
                p.normal_(0.0, 0.02)
    return model.to(device).eval()


class Case:
    """One timed call; an exception becomes the case's recorded error (the case is then skipped)."""

    def __init__(self, fn: Callable[[], Any], warm: bool = False):
        self.fn, self.error = fn, None
        self.warm = warm  # its code path already ran once in the setup (no warm-up call needed)

    def __call__(self) -> None:
        if self.error is not None:
            return
        try:
            self.fn()
        except Exception as error:  # noqa: BLE001 - a method that fails is a result
            lines = str(error).strip().splitlines()
            self.error = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
            common.log(f"case failed: {self.error}")


Key = tuple[str, str, bool, str]  # (method, stage, compiled, variant)


class LastLogits(torch.nn.Module):
    """``forward(batch) -> (B, C)``: the answer logits at the last position, asking the model for that
    position only (``logits_to_keep``) and for no key/value cache: the forward laplace-torch is given."""

    def __init__(self, model: torch.nn.Module, output_fn: Any):
        super().__init__()
        self.model, self.output_fn = model, output_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        kwargs = {**self.output_fn.model_kwargs(inputs), "use_cache": False}
        return self.output_fn(self.model(**inputs, **kwargs), inputs)


class _Loader:
    """Pre-built batches with ``.dataset`` of the data size (what laplace-torch's ``fit`` reads)."""

    def __init__(self, batches: list, n: int):
        self.batches, self.dataset = batches, range(n)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_cases(config: Config, args: argparse.Namespace) -> tuple[dict[Key, Case], dict[Key, dict], dict]:
    """Build the model and every case of ``config``; setup results (compile times, ...) as extras."""
    import bayesian_lora
    from bayesian_lora.main import jacobian_mean
    from transformers import BatchEncoding

    import flaplace

    device = args.device
    clock = time.perf_counter()
    model = build_model(config, device)
    batch = common.token_batch(config.batch, config.seq, vocab=config.vocab, device=device)
    setup: dict[str, Any] = {"build_s": time.perf_counter() - clock}
    answers = list(common.ANSWER_IDS)
    n_classes = len(answers)
    params = flaplace.select_params(model, "lora")
    output_fn = flaplace.LastTokenLogits(answers)
    model_fn = flaplace.ModelFunction(model, params, output_fn)
    lora_weights = [p for p in model.parameters() if p.requires_grad]
    trimmed = {**output_fn.model_kwargs(batch), "use_cache": False}  # ModelFunction's model call
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    stages = set(config.stages) & set(args.stages.split(",") if args.stages else STAGES)
    compiled_stages = set() if args.no_compile else set(config.compiled) & stages
    cases: dict[Key, Case] = {}
    extra: dict[Key, dict] = {}

    def add(
        method: str,
        stage: str,
        variant: str,
        fn: Callable[[], Any],
        compiled: bool = False,
        warm: bool = False,
    ) -> Key:
        key = (method, stage, compiled, variant)
        cases[key] = Case(fn, warm)
        return key

    # ---- forward + backward --------------------------------------------------------------------
    def forward_backward() -> None:
        for p in lora_weights:
            p.grad = None
        logits = output_fn(model(**inputs, **trimmed), batch)
        F.cross_entropy(logits.float(), batch["labels"]).backward()

    add("forward+backward", "forward_backward", "last-position logits", forward_backward, warm=True)
    forward_backward()  # one-time allocations before any setup is timed
    common.log(f"model built and one forward+backward done in {time.perf_counter() - clock:.0f} s")

    # ---- low-rank K-FAC ------------------------------------------------------------------------
    init, update = flaplace.build(model_fn, fisher="mc", sharing="last", **LOWRANK)
    clock = time.perf_counter()
    state0 = init(params, batch)  # finds the layers that share an input factor (one forward, once per fit)
    setup["flaplace_init_s"] = time.perf_counter() - clock
    torch.manual_seed(0)
    state_lr = update(state0, params, batch)
    factors_lr = flaplace.kfac_factors(state_lr)
    if "kfac_lowrank" in stages:
        add(
            "flaplace",
            "kfac_lowrank",
            "mc/last/lowrank",
            lambda: flaplace.kfac_factors(update(state0, params, batch)),
            warm=True,
        )
        if "kfac_lowrank" in compiled_stages:
            compiled_update, info = compile_case(update, (state0, params, batch), args.backend, device)
            key = add(
                "flaplace",
                "kfac_lowrank",
                "mc/last/lowrank",
                lambda: flaplace.kfac_factors(compiled_update(state0, params, batch)),
                compiled=True,
                warm=True,
            )
            extra[key] = info
            if compiled_update is None:
                cases[key].error = info["error"]
            common.log(f"compiled update: {info}")

    def readme_forward(model, b):  # bayesian-lora's README: project every position, keep the last
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, -1, answers]

    def trimmed_forward(model, b):  # the same model work as flaplace
        return output_fn(model(**{k: v for k, v in b.items() if k != "labels"}, **trimmed), b)

    def bayesian_lora_factors(forward: Callable) -> dict:
        factors = bayesian_lora.calculate_kronecker_factors(
            model, forward, [batch], LOWRANK["n_kfac"], LOWRANK["lr_threshold"], ["lora"]
        )
        factors = bayesian_lora.cholesky_decompose_small_factors(
            factors, LOWRANK["lr_threshold"], device, torch.float32
        )
        model.eval()  # calculate_kronecker_factors leaves the model in training mode
        for p in lora_weights:
            p.grad = None
        return factors

    bl_factors = bayesian_lora_factors(readme_forward)
    if "kfac_lowrank" in stages:
        add(
            "bayesian-lora",
            "kfac_lowrank",
            "mc/last/lowrank",
            lambda: bayesian_lora_factors(readme_forward),
            warm=True,
        )
        if not args.no_trimmed:
            add(
                "bayesian-lora",
                "kfac_lowrank",
                "mc/last/lowrank/trimmed",
                lambda: bayesian_lora_factors(trimmed_forward),
            )

    # ---- dense K-FAC ---------------------------------------------------------------------------
    la = None
    if "kfac_dense" in stages:
        init_d, update_d = flaplace.build(model_fn, fisher="mc", sharing="expand", lr_threshold=None)
        state_d0 = init_d(params, batch)
        add("flaplace", "kfac_dense", "mc/expand/dense", lambda: update_d(state_d0, params, batch))
    with_laplace = config.laplace_torch and not (args.worker == "memory" and args.no_laplace_memory)
    if with_laplace and stages & {"kfac_dense", "evidence", "prior_tuning", "predictive"}:
        from laplace import KronLaplace
        from laplace.curvature import CurvlinopsGGN

        la_model = LastLogits(model, output_fn)
        la = KronLaplace(
            la_model,
            "classification",
            backend=CurvlinopsGGN,
            backend_kwargs={"stochastic": True},
            prior_precision=1.0,
        )
        clock = time.perf_counter()
        try:
            la.fit(_Loader([batch], config.batch))  # the curvature and the eigendecompositions
            setup["laplace_torch_fit_s"] = time.perf_counter() - clock
            common.log(
                f"laplace-torch fit (with its eigendecompositions) in {setup['laplace_torch_fit_s']:.0f} s"
            )
        except Exception as error:  # noqa: BLE001
            setup["laplace_torch_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            common.log(f"laplace-torch fit failed: {setup['laplace_torch_error']}")
            la = None
        if "kfac_dense" in stages:
            key = add(
                "laplace-torch",
                "kfac_dense",
                "mc/expand/dense",
                lambda: la.backend.kron(batch, batch["labels"], N=config.batch),
                warm=True,
            )
            extra[key] = {"decompose": "not timed: KronLaplace.fit's eigendecompositions, see setup"}
            if la is None:
                cases[key].error = setup["laplace_torch_error"]

    # ---- evidence, prior tuning, predictive (low-rank posteriors; laplace-torch's dense one) -----
    posterior = flaplace.make_posterior(factors_lr, params, 1.0)
    ll = state_lr.log_likelihood
    s2 = torch.tensor(1.0)
    if "evidence" in stages:
        add("flaplace", "evidence", "lowrank", lambda: flaplace.log_marginal_likelihood(posterior, ll))
        if "evidence" in compiled_stages:
            compiled_evidence, info = compile_case(
                flaplace.log_marginal_likelihood, (posterior, ll), args.backend, device
            )
            key = add(
                "flaplace", "evidence", "lowrank", lambda: compiled_evidence(posterior, ll), compiled=True
            )
            extra[key] = info
            if compiled_evidence is None:
                cases[key].error = info["error"]
        add(
            "bayesian-lora",
            "evidence",
            "lowrank",
            lambda: bayesian_lora.model_evidence(model, ll, bl_factors, LORA_RANK, LOWRANK["n_kfac"], s2),
        )
        if la is not None:
            add("laplace-torch", "evidence", "dense", lambda: la.log_marginal_likelihood(torch.tensor(1.0)))
    if "prior_tuning" in stages:
        from peers_common import _bayesian_lora_tune

        add(
            "flaplace",
            "prior_tuning",
            "lowrank",
            lambda: flaplace.tune_prior_evidence(posterior, ll, progress=False),
        )
        add(
            "bayesian-lora",
            "prior_tuning",
            "lowrank",
            lambda: _bayesian_lora_tune(model, ll, bl_factors, LORA_RANK, LOWRANK["n_kfac"]),
        )
        extra[("bayesian-lora", "prior_tuning", False, "lowrank")] = {"steps": 200}
        if la is not None:

            def tune_laplace() -> None:
                la.prior_precision = 1.0
                la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=100, lr=0.1)

            key = add("laplace-torch", "prior_tuning", "dense", tune_laplace)
            extra[key] = {"steps": 100}
    if "predictive" in stages:
        cache = flaplace.predictive_precompute(posterior)

        def flaplace_predictive() -> torch.Tensor:
            f_mu, f_var = flaplace.linearised_predictive(model_fn, cache, batch, method="capture")
            return flaplace.predictive_probs(f_mu, f_var, link="probit")

        add("flaplace", "predictive", "lowrank", flaplace_predictive)
        if "predictive" in compiled_stages:
            covariance, info = None, {}
            jac = flaplace.per_example_jacobians(model_fn, params, batch, method="capture")
            covariance, info = compile_case(
                flaplace.predictive_covariance, (cache, jac), args.backend, device
            )

            def flaplace_predictive_compiled() -> torch.Tensor:
                jacobians = flaplace.per_example_jacobians(model_fn, params, batch, method="capture")
                with torch.no_grad():
                    f_mu = model_fn(params, batch)
                return flaplace.predictive_probs(f_mu, covariance(cache, jacobians), link="probit")

            key = add("flaplace", "predictive", "lowrank", flaplace_predictive_compiled, compiled=True)
            extra[key] = {**info, "compiled_part": "the covariance (the Jacobians stay eager)"}
            if covariance is None:
                cases[key].error = info["error"]

        def bayesian_lora_predictive() -> tuple[torch.Tensor, torch.Tensor]:
            jacobian, f_mu = jacobian_mean(
                model, BatchEncoding(dict(inputs)), output_callback=lambda out: out.logits[:, -1, answers]
            )
            f_var = bayesian_lora.variance(
                BatchEncoding(dict(inputs)),
                jacobian,
                bl_factors,
                s2,
                n_classes,
                LORA_RANK,
                LOWRANK["n_kfac"],
                device,
            )
            return f_mu.detach(), f_var.detach()

        add("bayesian-lora", "predictive", "lowrank", bayesian_lora_predictive)
        if la is not None:
            add(
                "laplace-torch",
                "predictive",
                "dense",
                lambda: la(batch, pred_type="glm", link_approx="probit"),
            )
    return cases, extra, setup


def worker(args: argparse.Namespace) -> list[dict]:
    common.quiet()
    torch.set_num_threads(args.threads)
    config = all_configs()[args.config]
    repeats = args.repeats or config.repeats
    cases, extra, setup = make_cases(config, args)
    common.log(
        f"{args.config}: setup done ({', '.join(f'{k} {v:.1f}' for k, v in setup.items() if isinstance(v, float))})"
    )
    cold = [key for key, case in cases.items() if not case.warm]
    common.log(f"{args.config}: one untimed call of the {len(cold)} cases whose code has not run yet")
    for key in cold:  # one-time allocations and caches out of the measured calls
        cases[key]()
    if args.worker == "memory":
        gc.collect()
        peaks = common.peak_memory(cases, device=args.device)  # type: ignore[arg-type]
        return [{"key": list(key), "peak_mb": peak} for key, peak in peaks.items()]
    common.log(f"{args.config}: timing {len(cases)} cases, {repeats} interleaved rounds")
    load_before = os.getloadavg()
    measured = common.interleaved(
        cases,  # type: ignore[arg-type]
        repeats=repeats,
        warmup=0,  # the setup and the untimed calls above warmed every case up
        device=args.device,
        log=lambda m: common.log(f"{args.config}: {m}"),
    )
    env = common.environment(args.device)
    records = []
    for key, case in cases.items():
        method, stage, compiled, variant = key
        result = measured[key]
        records.append(
            {
                "config": args.config,
                "run": args.run,
                "method": method,
                "stage": stage,
                "compiled": compiled,
                "median_s": None if case.error else result["median_s"],
                "peak_mb": None
                if case.error
                else (result["peak_mb"] if args.device.startswith("cuda") else None),
                "variant": variant,
                "times": None if case.error else result["times"],
                **({"error": case.error} if case.error else {}),
                **extra.get(key, {}),
                **{
                    k: v
                    for k, v in asdict(config).items()
                    if k in ("hidden", "seq", "batch", "lora", "layers")
                },
                "repeats": repeats,
                "device": env["device"],
                "gpu": env.get("gpu"),
                "threads": env["threads"],
                "torch": env["torch"],
                "flaplace": env.get("flaplace"),
                "setup": setup,
                "loadavg": [list(load_before), list(os.getloadavg())],
            }
        )
    return records


def run_config(name: str, args: argparse.Namespace) -> list[dict]:
    """The timing worker of one config, then (CPU) its memory worker; records with ``peak_mb``."""
    worker_args = [
        "--run",
        args.run,
        "--config",
        name,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--backend",
        args.backend,
    ]
    if args.repeats:
        worker_args += ["--repeats", str(args.repeats)]
    if args.no_compile:
        worker_args.append("--no-compile")
    if args.no_laplace_memory:
        worker_args.append("--no-laplace-memory")
    if args.stages:
        worker_args += ["--stages", args.stages]
    if args.no_trimmed:
        worker_args.append("--no-trimmed")
    measure_memory = not args.device.startswith("cuda") and not args.no_memory
    memory_call = lambda: common.run_worker(  # noqa: E731
        SCRIPT, ["--worker", "memory", *worker_args], timeout=args.timeout, env=common.MEMORY_ENV
    )
    if measure_memory and args.concurrent_memory:
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1)
        memory_future = pool.submit(memory_call)
    common.log(f"timing {name}")
    records, error = common.run_worker(SCRIPT, ["--worker", "timing", *worker_args], timeout=args.timeout)
    if error:
        common.log(f"{name}: {error}")
        return [
            {
                "config": name,
                "method": "all",
                "stage": "-",
                "compiled": False,
                "median_s": None,
                "peak_mb": None,
                "error": error,
            }
        ]
    if measure_memory:
        common.log(f"memory {name}")
        peaks, memory_error = memory_future.result() if args.concurrent_memory else memory_call()
        by_key = {tuple(p["key"]): p["peak_mb"] for p in peaks}
        for r in records:
            if r["median_s"] is not None:
                r["peak_mb"] = by_key.get((r["method"], r["stage"], r["compiled"], r["variant"]))
        if memory_error:
            common.log(f"memory {name}: {memory_error}")
            for r in records:
                r["memory_error"] = memory_error
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=None, help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: per config, 3)")
    parser.add_argument(
        "--quick", action="store_true", help="hidden 128, 1 round; writes /tmp, no docs update"
    )
    parser.add_argument("--output", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUTPUT})")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile-d cases")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of {list(STAGES)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory worker")
    parser.add_argument(
        "--no-trimmed", action="store_true", help="leave out bayesian-lora with a last-position-only forward"
    )
    parser.add_argument(
        "--concurrent-memory",
        action="store_true",
        help="run the CPU memory worker beside the timing worker instead of after it (memory is a "
        "resident-set rise, unaffected by the CPU the two share; for a crowded machine)",
    )
    parser.add_argument(
        "--no-laplace-memory",
        action="store_true",
        help="leave laplace-torch out of the memory worker (its fit eigendecomposes every dense factor)",
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager as fallback)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU adds the 1024-token configs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the workers")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs section from the JSON")
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="add the records of FILE (e.g. a GPU run's scale_cuda.json) to the results JSON, replacing "
        "those of the same config, device and stage, and rewrite the docs section",
    )
    parser.add_argument(
        "--run",
        default=time.strftime("%Y-%m-%dT%H:%M"),
        help="label of this run in the records (default: now)",
    )
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["timing", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        common.write_worker_output(args.worker_output, worker(args))
        return 0
    output = args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    if args.merge:
        records = merge(
            json.loads(output.read_text()) if output.exists() else [], json.loads(args.merge.read_text())
        )
        common.write_results(output, records)
        common.log(f"merged {args.merge} into {output} ({len(records)} records)")
    if args.docs_only or args.merge:
        common.update_docs_section("scale", docs_markdown(json.loads(output.read_text())))
        return 0
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    elif args.quick:
        configs = list(QUICK)
    else:
        configs = list(CONFIGS) if args.device.startswith("cuda") else list(CPU_DEFAULT)
    unknown = [c for c in configs if c not in all_configs()]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(all_configs())}")
    started = time.perf_counter()
    records: list[dict] = []
    for name in configs:
        records += run_config(name, args)
    if output == DEFAULT_OUTPUT and output.exists():  # keep other devices', configs' and stages' records
        records = merge(json.loads(output.read_text()), records)
    common.write_results(output, records)
    common.log(f"wrote {output} ({len(records)} records) in {(time.perf_counter() - started) / 60:.1f} min")
    for t in ratios(records):
        memory = "-" if t["memory_ratio"] is None else f"{t['memory_ratio']:.2f}"
        common.log(
            f"{t['config']} {t['stage']}: flaplace {t['flaplace']} / {t['peer']}: time {t['time_ratio']:.2f}, memory {memory}"
        )
    for t in done_when(records):
        common.log(f"done-when {t['config']}: {'met' if t['met'] else 'NOT met'}")
    if output == DEFAULT_OUTPUT:
        common.update_docs_section("scale", docs_markdown(records))
        common.log(f"updated {common.DOCS_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
