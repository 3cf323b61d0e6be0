"""Full-vocabulary linearised predictive: time and peak memory against one plain forward.

One Llama-architecture PEFT model with SmolLM2-135M's width (hidden 576, 9 heads, vocabulary
49152; ``LAYERS`` blocks instead of 30 to fit the shared CPU), LoRA r=8 on q/v, random weights,
and one batch of ``BATCH`` sequences of ``SEQ`` tokens. The posterior is K-FAC (``fit_kfac``,
``n_kfac=10``) on two small batches with prior precision 1. Cases, all on the same batch:

* ``forward``: ``f(theta*, batch)``, the ``(B, T, V)`` logits (no gradient), the unit of cost;
* ``vocab-chunk8``: ``flaplace.vocabulary_predictive`` with ``chunk_size=8`` (one ``vmap`` of
  ``jvp`` per 8 samples, running sums only: memory bounded whatever S), for S = 4, 16, 64;
* ``vocab-chunk1``: ``chunk_size=1`` (one ``jvp`` per sample, the smallest memory; each ``jvp``
  recomputes the primal), for S = 4 only by default (``--chunk1-max``) to save CPU time;
* ``vocab-unchunked``: the same with ``chunk_size=None`` (one ``vmap`` of ``jvp`` over all S
  samples; the primal is computed once and all S tangents are held at once).

Times come from one worker process (interleaved rounds, medians); peak memory (the rise of the
resident set during one call) from a second worker started with glibc's mmap threshold lowered
(see ``_common.py``). Results: ``benchmarks/results/full_vocab.json``.

Run ``python benchmarks/full_vocab.py`` (or ``--quick``: S = 4 and 16, one round).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import _common as common
import torch

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = common.RESULTS / "full_vocab.json"
HIDDEN, LAYERS, VOCAB, RANK = 576, 4, 49152, 8
BATCH, SEQ = 1, 32
SAMPLES = (4, 16, 64)
CONFIG = f"llama-h{HIDDEN}-l{LAYERS}-v{VOCAB}-b{BATCH}-s{SEQ}"


def build_cases(args) -> dict[tuple, Callable[[], object]]:
    import flaplace

    common.quiet()
    torch.set_num_threads(args.threads)
    model = common.llama_lora_model(HIDDEN, layers=LAYERS, vocab=VOCAB, rank=RANK)
    params = flaplace.select_params(model, "lora")
    kfac_fn = flaplace.ModelFunction(model, params, flaplace.LastTokenLogits(common.ANSWER_IDS))
    train = [
        {"input_ids": common.token_batch(4, SEQ, vocab=VOCAB, seed=100 + i)["input_ids"]} for i in range(2)
    ]
    factors, _ = flaplace.fit_kfac(kfac_fn, params, train, progress=False, n_kfac=10, lr_threshold=100)
    posterior = flaplace.make_posterior(factors, params, 1.0)
    f = flaplace.TokenLogitsFunction(model, params)
    batch = {"input_ids": common.token_batch(BATCH, SEQ, vocab=VOCAB, seed=1)["input_ids"]}

    def forward() -> object:
        with torch.no_grad():
            return f(params, batch)

    cases: dict[tuple, Callable[[], object]] = {("forward", 0): forward}
    for s in args.samples:
        for name, chunk in (("vocab-chunk1", 1), ("vocab-chunk8", 8), ("vocab-unchunked", None)):
            if chunk == 1 and s > args.chunk1_max:
                continue

            def case(s: int = s, chunk: int | None = chunk) -> object:
                with torch.no_grad():
                    return flaplace.vocabulary_predictive(
                        f, posterior, batch, s, generator=torch.Generator().manual_seed(0), chunk_size=chunk
                    )

            cases[(name, s)] = case
    return cases


def worker(args) -> list[dict]:
    cases = build_cases(args)
    if args.worker == "memory":
        peaks = common.peak_memory(cases)
        return [{"key": list(k), "peak_mb": v} for k, v in peaks.items()]
    measured = common.interleaved(cases, repeats=args.repeats, warmup=1, log=common.log)
    return [{"key": list(k), "median_s": r["median_s"], "times": r["times"]} for k, r in measured.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["timing", "memory"])
    parser.add_argument("--worker-output")
    parser.add_argument("--samples", type=int, nargs="+", default=list(SAMPLES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk1-max", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if args.worker:
        common.write_worker_output(args.worker_output, worker(args))
        return
    if args.quick:
        args.samples, args.repeats = [4, 16], 1
    common_args = ["--samples", *map(str, args.samples), "--threads", str(args.threads)]
    common_args += ["--chunk1-max", str(args.chunk1_max)]
    peaks, times = common.memory_and_timing_workers(SCRIPT, common_args, args.repeats)
    fwd_s = times[("forward", 0)]["median_s"]
    fwd_mb = peaks[("forward", 0)]
    logits_mb = BATCH * SEQ * VOCAB * 4 / 2**20
    env = common.environment()
    records = []
    for key, t in times.items():
        method, s = key
        record = {
            "config": CONFIG,
            "method": method,
            "samples": s,
            "median_s": t["median_s"],
            "times": t["times"],
            "peak_mb": peaks.get(key),
            "time_vs_forward": t["median_s"] / fwd_s,
            "peak_vs_forward": peaks.get(key, float("nan")) / fwd_mb,
            "peak_in_logits_tensors": peaks.get(key, float("nan")) / logits_mb,
            "forward_equivalents_per_sample": t["median_s"] / fwd_s / s if s else 1.0,
            "repeats": args.repeats,
            "logits_mb": logits_mb,
            **{k: env.get(k) for k in ("torch", "threads", "device", "flaplace")},
        }
        records.append(record)
        common.log(
            f"{method:16s} S={s:3d}  {t['median_s']:.3f} s  x{record['time_vs_forward']:.1f} forward  "
            f"{record['forward_equivalents_per_sample']:.2f} fwd/sample  peak {record['peak_mb']:.0f} MB"
        )
    common.write_results(args.output, records)


if __name__ == "__main__":
    main()
