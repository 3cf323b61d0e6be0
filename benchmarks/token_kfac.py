"""Token-level K-FAC (generative fine-tuning) against a plain SFT training step: time and peak memory.

One Llama-architecture PEFT model with SmolLM2-135M's width (hidden 576, 9 heads, vocabulary
49152; ``LAYERS`` blocks instead of 30 to fit the CPU), LoRA r=8 on q/v, random weights, and one
batch of ``BATCH`` sequences of ``SEQ`` tokens whose first ``PROMPT`` tokens are masked (-100) and
the rest supervised, as an SFT collator makes them. Cases, on the same batch:

* ``sft_step``: one training step's gradient work, ``model(**batch).loss.backward()`` with
  respect to the LoRA weights (Hugging Face projects every position onto the vocabulary);
* ``token_kfac_mc``: one ``update`` of ``flaplace.build(ModelFunction(model, params,
  SupervisedTokenLogits()), fisher="mc")`` (one sampled token per supervised position, one
  pull-back; ``n_kfac=10``, low-rank factors on the 576-wide sides), from a fresh state.

Each case eager and, with ``--compile``, ``torch.compile``-d (the SFT step's forward and loss;
the K-FAC ``update`` without ``fullgraph``, since the supervised rows have a data-dependent
count; its vocabulary-sized steps, the softmax, the sampling and the log-likelihood in place over
one ``(n_supervised, vocab)`` buffer, run eagerly inside it). Times come from one worker process (interleaved rounds, medians); peak memory (the rise of
the resident set during one call) from a second worker started with glibc's mmap threshold
lowered (see ``_common.py``). Results: ``benchmarks/results/token_kfac.json``.

One thread by default (``--threads``): on a CPU shared with other jobs, two OpenMP threads made
the small QR and eigen decompositions of the low-rank factors hundreds of times slower (a 576 x 40
QR took 110 ms with two threads and 0.1 ms with one), which measures the contention, not the update.

Run ``python benchmarks/token_kfac.py`` (``--repeats 3`` by default; ``--compile`` adds the
compiled cases).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import _common as common
import torch

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = common.RESULTS / "token_kfac.json"
HIDDEN, LAYERS, VOCAB, RANK = 576, 2, 49152, 8
BATCH, SEQ, PROMPT = 2, 256, 64
CONFIG = f"llama-h{HIDDEN}-l{LAYERS}-v{VOCAB}-b{BATCH}-s{SEQ}-prompt{PROMPT}"


def sft_batch() -> dict[str, torch.Tensor]:
    ids = common.token_batch(BATCH, SEQ, vocab=VOCAB, seed=1)["input_ids"]
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build_cases(args) -> dict[tuple, Callable[[], object]]:
    from flaplace.kfac import build
    from flaplace.params import ModelFunction, select_params
    from flaplace.tokens import SupervisedTokenLogits

    common.quiet()
    torch.set_num_threads(args.threads)
    model = common.llama_lora_model(HIDDEN, layers=LAYERS, vocab=VOCAB, rank=RANK)
    model.eval()  # no dropout in either case (the LoRA dropout is 0 anyway)
    params = select_params(model, "lora")
    batch = sft_batch()
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_of() -> torch.Tensor:
        return model(**batch, use_cache=False).loss

    compiled_loss = torch.compile(loss_of) if args.compile else None

    def sft_step(loss_fn: Callable[[], torch.Tensor] = loss_of) -> object:
        for p in trainable:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    f = ModelFunction(model, params, SupervisedTokenLogits())
    init, update = build(f, fisher="mc", n_kfac=10, lr_threshold=100)
    state = init(params, batch)
    cases: dict[tuple, Callable[[], object]] = {
        ("sft_step", False): sft_step,
        ("token_kfac_mc", False): lambda: update(state, params, batch),
    }
    if args.compile:
        assert compiled_loss is not None
        compiled_update = torch.compile(update)
        common.log("compiling (first calls)")
        sft_step(compiled_loss)
        compiled_update(state, params, batch)
        cases[("sft_step", True)] = lambda: sft_step(compiled_loss)
        cases[("token_kfac_mc", True)] = lambda: compiled_update(state, params, batch)
    return cases


def worker(args) -> list[dict]:
    cases = build_cases(args)
    if args.worker == "memory":
        for case in cases.values():  # first calls (allocator and compilation caches) outside the peaks
            case()
        peaks = common.peak_memory(cases)
        return [{"key": list(k), "peak_mb": v} for k, v in peaks.items()]
    measured = common.interleaved(cases, repeats=args.repeats, warmup=1, log=common.log)
    return [{"key": list(k), "median_s": r["median_s"], "times": r["times"]} for k, r in measured.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["timing", "memory"])
    parser.add_argument("--worker-output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if args.worker:
        common.write_worker_output(args.worker_output, worker(args))
        return
    shared = ["--threads", str(args.threads), *(["--compile"] if args.compile else [])]
    peaks, times = common.memory_and_timing_workers(SCRIPT, shared, args.repeats)
    env = common.environment()
    records = []
    for key, t in sorted(times.items(), key=lambda item: (item[0][1], item[0][0])):
        case, compiled = key
        reference = ("sft_step", compiled)
        record = {
            "case": case,
            "median_s": t["median_s"],
            "peak_mb": peaks.get(key),
            "compiled": compiled,
            "time_vs_sft_step": t["median_s"] / times[reference]["median_s"],
            "peak_vs_sft_step": peaks.get(key, float("nan")) / peaks.get(reference, float("nan")),
            "times": t["times"],
            "repeats": args.repeats,
            "config": CONFIG,
            "supervised_tokens": BATCH * (SEQ - PROMPT),
            **{k: env.get(k) for k in ("torch", "threads", "device", "flaplace")},
        }
        records.append(record)
        common.log(
            f"{case:14s} compiled={compiled!s:5s} {t['median_s']:.3f} s (x{record['time_vs_sft_step']:.2f} SFT step)  "
            f"peak {record['peak_mb']:.0f} MB (x{record['peak_vs_sft_step']:.2f})"
        )
    common.write_results(args.output, records)


if __name__ == "__main__":
    main()
