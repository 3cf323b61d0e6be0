"""Linearised predictive: per-example Jacobians + ``J Sigma J^T``, flaplace against bayesian-lora.

One Llama-architecture PEFT model (hidden 256, 2 layers, vocabulary 1024, LoRA r=8 on q/v,
sequences of 64 tokens, no padding), K-FAC factors from 4 batches of 8, prior precision 1
(prior variance 1). For batches of 4, 8, 16, 32 and 64 it times one predictive step (the
Jacobians of the 4 answer logits and the ``(B, 4, 4)`` covariance):

* ``flaplace-vmap`` / ``flaplace-capture`` / ``flaplace-loop``: ``flaplace.linearised_predictive``
  with ``method="vmap"`` (``vmap`` of ``jacrev`` over examples), ``"capture"`` (one forward and
  ``C`` pull-backs for the whole batch, the K-FAC capture mechanism) and ``"loop"``, on a
  posterior from ``flaplace.make_posterior`` (precomputed once with ``predictive_precompute``);
* ``flaplace-capture`` compiled: ``capture`` Jacobians (eager) followed by
  ``torch.compile(flaplace.predictive_covariance)``; compiling the Jacobian step itself took too
  long on 2 CPU cores to include;
* ``bayesian-lora``: ``jacobian_mean`` + ``variance`` as its README shows, with its own K-FAC
  factors (``n_kfac=10``, ``lr_threshold=100``, small factors Cholesky-decomposed as its example
  does). Its ``jacobian_mean`` default output callback refers to an undefined ``cfg`` and raises
  ``NameError``, so an explicit ``output_callback`` (last-token logits of the answer ids) is passed.

Run ``python benchmarks/predictive.py`` (the full job) or ``--quick`` (batches 4 and 8).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import torch

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = common.RESULTS / "predictive.json"
HIDDEN, SEQ, VOCAB, RANK = 256, 64, 1024, 8
BATCHES = (4, 8, 16, 32, 64)
KFAC_BATCHES, KFAC_BATCH = 4, 8
N_KFAC, LR_THRESHOLD = 10, 100
PRIOR_PRECISION = 1.0
CONFIG = f"llama-h{HIDDEN}-s{SEQ}"


def _setup(device: str):
    import flaplace

    common.quiet()
    model = common.llama_lora_model(HIDDEN, vocab=VOCAB, rank=RANK, device=device)
    params = flaplace.select_params(model, "lora")
    model_fn = flaplace.ModelFunction(model, params, flaplace.LastTokenLogits(common.ANSWER_IDS))
    train = [
        {
            "input_ids": common.token_batch(KFAC_BATCH, SEQ, vocab=VOCAB, seed=100 + i, device=device)[
                "input_ids"
            ]
        }
        for i in range(KFAC_BATCHES)
    ]
    factors, _ = flaplace.fit_kfac(
        model_fn, params, train, progress=False, n_kfac=N_KFAC, lr_threshold=LR_THRESHOLD
    )
    posterior = flaplace.make_posterior(factors, params, PRIOR_PRECISION)
    cache = flaplace.predictive_precompute(posterior)
    return model, params, model_fn, train, cache


def _bayesian_lora(model, train: list[dict], device: str):
    """bayesian-lora's factors (Cholesky of the small ones, as its example does) and its predictive step."""
    from bayesian_lora import calculate_kronecker_factors
    from bayesian_lora.main import cholesky_decompose_small_factors, jacobian_mean, variance
    from transformers import BatchEncoding

    answer_ids = list(common.ANSWER_IDS)

    def fwd_call(model, batch):
        return model(**batch).logits[:, -1, answer_ids]

    torch.manual_seed(0)
    factors = calculate_kronecker_factors(model, fwd_call, train, N_KFAC, LR_THRESHOLD, ["lora"])
    model.eval()
    factors = cholesky_decompose_small_factors(factors, LR_THRESHOLD, device, torch.float32)
    prior_var = torch.tensor(1.0 / PRIOR_PRECISION)

    def step(batch: dict):
        inputs = BatchEncoding(batch)
        jacobian, f_mu = jacobian_mean(
            model, inputs, output_callback=lambda out: out.logits[:, -1, answer_ids]
        )
        f_var = variance(inputs, jacobian, factors, prior_var, len(answer_ids), RANK, N_KFAC, device)
        return f_mu, f_var

    return step


def build_cases(args) -> tuple[dict[tuple, Callable[[], object]], dict[tuple, dict]]:
    import flaplace
    from flaplace.jacobians import jacobians_and_logits

    device = args.device
    torch.set_num_threads(args.threads)
    model, params, model_fn, train, cache = _setup(device)
    batches = {
        b: {"input_ids": common.token_batch(b, SEQ, vocab=VOCAB, seed=b, device=device)["input_ids"]}
        for b in args.batches
    }
    cases: dict[tuple, Callable[[], object]] = {}
    extra: dict[tuple, dict] = {}
    for method in args.methods:
        for b, batch in batches.items():
            if method == "bayesian-lora":
                continue
            cases[(f"flaplace-{method}", b, False)] = lambda m=method, x=batch: (
                flaplace.linearised_predictive(model_fn, cache, x, method=m)
            )
    if not args.no_compile:
        # Jacobians by the capture, eagerly; the covariance compiled (compiling the capture's
        # per-class pull-backs too fails in AOTAutograd: "Cannot access storage of TensorWrapper")
        covariance = torch.compile(flaplace.predictive_covariance, backend=args.backend)

        def compiled(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
            jacobians, f_mu = jacobians_and_logits(model_fn, cache.mean, x, method="capture")
            return f_mu, covariance(cache, jacobians)

        for b, batch in batches.items():
            start = time.perf_counter()
            try:
                compiled(batch)
            except Exception as error:  # noqa: BLE001 - record why
                common.log(f"compiled predictive failed at batch {b}: {type(error).__name__}: {error}")
                extra[("flaplace-capture", b, True)] = {"error": f"{type(error).__name__}: {error}"[:300]}
                continue
            extra[("flaplace-capture", b, True)] = {
                "backend": args.backend,
                "compile_s": time.perf_counter() - start,
            }
            cases[("flaplace-capture", b, True)] = lambda x=batch: compiled(x)
    if "bayesian-lora" in args.methods:
        step = _bayesian_lora(model, train, device)
        for b, batch in batches.items():
            if b <= args.blora_max_batch:
                cases[("bayesian-lora", b, False)] = lambda x=batch: step(x)
    if args.worker == "timing":
        extra[("agreement", 0, False)] = _agreement(model_fn, cache, batches[min(batches)], args.methods)
    return cases, extra


def _agreement(model_fn, cache, batch, methods) -> dict:
    """Largest relative difference of ``f_var`` between flaplace's Jacobian methods on one batch."""
    import flaplace

    ours = [m for m in methods if m != "bayesian-lora"]
    f_vars = {m: flaplace.linearised_predictive(model_fn, cache, batch, method=m)[1] for m in ours}
    first = f_vars[ours[0]]
    return {m: float((v - first).norm() / first.norm()) for m, v in f_vars.items()}


def worker(args) -> list[dict]:
    cases, extra = build_cases(args)
    if args.worker == "memory":
        peaks = common.peak_memory(cases, device=args.device)
        return [{"key": list(k), "peak_mb": v} for k, v in peaks.items()]
    common.log(f"timing {len(cases)} cases, {args.repeats} interleaved rounds after a warm-up")
    measured = common.interleaved(cases, repeats=args.repeats, warmup=1, device=args.device, log=common.log)
    env = common.environment(args.device)
    records = []
    for (method, batch, compiled), result in measured.items():
        records.append(
            {
                "config": CONFIG,
                "method": method,
                "batch": batch,
                "compiled": compiled,
                "median_s": result["median_s"],
                "peak_mb": result["peak_mb"],
                "per_example_s": result["median_s"] / batch,
                "repeats": args.repeats,
                "times": result["times"],
                **extra.get((method, batch, compiled), {}),
                "device": env["device"],
                "torch": env["torch"],
                "threads": env["threads"],
                "flaplace": env.get("flaplace"),
            }
        )
    for key, info in extra.items():
        if key not in measured and key[0] != "agreement":
            records.append(
                {
                    "config": CONFIG,
                    "method": key[0],
                    "batch": key[1],
                    "compiled": key[2],
                    "median_s": None,
                    "peak_mb": None,
                    **info,
                }
            )
    agreement = extra.get(("agreement", 0, False))
    if agreement:
        records.append(
            {
                "config": CONFIG,
                "method": "agreement",
                "batch": min(args.batches),
                "compiled": False,
                "median_s": None,
                "peak_mb": None,
                "f_var_rel_diff": agreement,
            }
        )
    return records


def check_targets(records: list[dict]) -> list[dict]:
    timed = {(r["method"], r["batch"], r["compiled"]): r["median_s"] for r in records if r.get("median_s")}
    out = []
    for method, compiled in sorted({(m, c) for m, _, c in timed if m.startswith("flaplace")}):
        small, large = timed.get((method, 8, compiled)), timed.get((method, 64, compiled))
        if small and large:
            ratio = (large / 64) / (small / 8)
            out.append(
                {
                    "target": f"{method}{' (compiled)' if compiled else ''}: per-example time at 64 <= 1.5 x at 8",
                    "ratio": ratio,
                    "limit": 1.5,
                    "met": ratio <= 1.5,
                }
            )
        theirs, ours = timed.get(("bayesian-lora", 32, False)), timed.get((method, 32, compiled))
        if theirs and ours:
            speedup = theirs / ours
            out.append(
                {
                    "target": f"{method}{' (compiled)' if compiled else ''}: at batch 32, >= 10 x faster than bayesian-lora",
                    "ratio": speedup,
                    "limit": 10.0,
                    "met": speedup >= 10,
                }
            )
    return out


def docs_markdown(records: list[dict], targets: list[dict]) -> str:
    env = next((r for r in records if r.get("torch")), {})
    timed = [r for r in records if r["method"] != "agreement"]
    methods = sorted({(r["method"], r["compiled"]) for r in timed})
    batches = sorted({r["batch"] for r in timed})
    by = {(r["method"], r["compiled"], r["batch"]): r for r in timed}

    def cell(r):
        if r is None:
            return "not run"
        if r.get("median_s") is None:
            return "failed"
        return (
            f"{r['median_s']:.3g} s ({1000 * r['median_s'] / r['batch']:.3g} ms/ex, {r['peak_mb']:.0f} MB)"
            if r.get("peak_mb") is not None
            else f"{r['median_s']:.3g} s"
        )

    rows = []
    for method, compiled in methods:
        backend = next((r.get("backend") for r in timed if r["method"] == method and r["compiled"]), None)
        label = method + (f" + compiled covariance ({backend})" if compiled else "")
        rows.append([label, *[cell(by.get((method, compiled, b))) for b in batches]])
    agreement = next((r for r in records if r["method"] == "agreement"), None)
    lines = [
        "## Linearised predictive: flaplace against bayesian-lora",
        "",
        f"Measured by `benchmarks/predictive.py` (torch {env.get('torch', '?')}, {env.get('device', 'cpu')}, "
        f"threads: {env.get('threads', '?')}). Llama architecture, hidden {HIDDEN}, 2 layers, vocabulary {VOCAB}, "
        f"PEFT LoRA r={RANK} on `q_proj`/`v_proj`, {SEQ} tokens per example, no padding, "
        f"{len(common.ANSWER_IDS)} answer logits. One step = per-example Jacobians + `(B, C, C)` covariance "
        "(K-FAC factors and the posterior's eigen-decomposition are computed once, outside the timing). "
        "Median time over interleaved repeats after a warm-up; in brackets the time per example and the "
        "peak memory (resident-set rise of one call, measured in a separate process). `compiled`: Jacobians by "
        "`capture` (eager), then `torch.compile(flaplace.predictive_covariance)`. bayesian-lora is not run at "
        "batch 64: its whole-batch `jacrev` costs grow with the square of the batch (see its batch-32 cell). "
        "flaplace's `LastTokenLogits` model function asks the model for the last position's logits only "
        "(`logits_to_keep`); bayesian-lora's forward projects every position, as its example does.",
        "",
        common.markdown_table(["method", *[f"batch {b}" for b in batches]], rows),
        "",
    ]
    if agreement:
        diffs = ", ".join(f"{m}: {v:.1e}" for m, v in agreement["f_var_rel_diff"].items())
        lines += [
            f"`f_var` of flaplace's Jacobian methods agree (relative difference to the first, batch "
            f"{agreement['batch']}): {diffs}.",
            "",
        ]
    lines += [
        "### Targets",
        "",
        common.markdown_table(
            ["target", "ratio", "limit", "met"],
            [
                [t["target"], f"{t['ratio']:.2f}", f"{t['limit']:.1f}", "yes" if t["met"] else "**no**"]
                for t in targets
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument(
        "--methods",
        default="capture,vmap,loop,bayesian-lora",
        help="comma-separated subset of capture, vmap, loop, bayesian-lora",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batches 4 and 8, 3 repeats, no docs update")
    parser.add_argument("--output", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUTPUT})")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument(
        "--blora-max-batch",
        type=int,
        default=32,
        help="largest batch given to bayesian-lora (its cost grows with the square of the batch)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust to other jobs)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--docs-only", action="store_true", help="rewrite the docs section from the results JSON, run nothing"
    )
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["timing", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batches = [4, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quick:
        args.repeats = min(args.repeats, 3)
    if args.worker:
        common.write_worker_output(args.worker_output, worker(args))
        return 0

    output = args.output or (Path("/tmp/predictive.quick.json") if args.quick else DEFAULT_OUTPUT)
    if args.docs_only:
        records = json.loads(output.read_text())
        common.update_docs_section("predictive", docs_markdown(records, check_targets(records)))
        return 0
    base = [
        "--batches",
        ",".join(map(str, args.batches)),
        "--methods",
        ",".join(args.methods),
        "--repeats",
        str(args.repeats),
        "--backend",
        args.backend,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--blora-max-batch",
        str(args.blora_max_batch),
    ] + (["--no-compile"] if args.no_compile else [])
    started = time.perf_counter()
    common.log("timing")
    records, error = common.run_worker(SCRIPT, ["--worker", "timing", *base], timeout=args.timeout)
    if error:
        common.log(f"timing worker: {error}")
    elif not args.device.startswith("cuda"):
        common.log("memory")
        peaks, error = common.run_worker(
            SCRIPT, ["--worker", "memory", *base], timeout=args.timeout, env=common.MEMORY_ENV
        )
        by_key = {tuple(p["key"]): p["peak_mb"] for p in peaks}
        for r in records:
            r["peak_mb"] = by_key.get((r["method"], r["batch"], r["compiled"]), r.get("peak_mb"))
        if error:
            common.log(f"memory worker: {error}")
    targets = check_targets(records)
    common.write_results(output, records)
    common.log(f"wrote {output} ({len(records)} records) in {(time.perf_counter() - started) / 60:.1f} min")
    for t in targets:
        common.log(f"{t['target']}: {t['ratio']:.2f} -> {'met' if t['met'] else 'NOT met'}")
    if output == DEFAULT_OUTPUT:
        common.update_docs_section("predictive", docs_markdown(records, targets))
        common.log(f"updated {common.DOCS_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
