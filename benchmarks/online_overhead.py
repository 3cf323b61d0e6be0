"""The cost of online evidence tuning per optimiser step, against training with a fixed prior.

A random Llama (hidden ``--hidden``, ``--layers`` blocks) with LoRA r=8 on q/v, scored on the
last-position logits of four answer tokens; batches of ``--batch`` random sequences of
``--seq`` tokens. Each case trains ``--steps`` AdamW steps on ``mean NLL + prior_penalty``:

* ``fixed``: the penalty of a fixed prior precision (the training time alone);
* ``online-<fisher>-every<k>-window<w>``: the same loop with ``build_online_evidence``'s
  ``update`` after every step: a refresh every ``k`` steps on the batches of the last ``w``
  (default K-FAC settings, at most 100 evidence steps per refresh).

Reported per case (medians of ``--repeats`` runs): the training time per optimiser step, the
time spent in ``update`` as a fraction of the training time of the same run (both measured step
by step in one loop, so a change in the machine's load affects them alike), and the time of one
refresh.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/online_overhead.py --threads 1

Writes ``benchmarks/results/online_overhead.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import ANSWER_IDS, RESULTS, environment, llama_lora_model, log, quiet, token_batch, write_results

from flaplace.online import build_online_evidence, prior_penalty
from flaplace.params import LastTokenLogits, ModelFunction, select_params


def train(model_fn, start, batches, steps: int, online: dict[str, Any] | None) -> tuple[float, float, int]:
    """``(training seconds, online-update seconds, refreshes)`` for ``steps`` optimiser steps.

    The two times are measured in the same loop, step by step, so a change in the machine's load
    during the run affects both alike.
    """
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in start.items()}
    optimizer = torch.optim.AdamW(theta.values(), lr=1e-3, weight_decay=0.0)
    n_train = len(batches) * batches[0]["labels"].shape[0]
    update = state = None
    if online is not None:
        init, update = build_online_evidence(model_fn, n_train=n_train, **online)
        state = init(theta)
    precision = 1.0
    training = updating = 0.0
    for step in range(steps):
        batch = batches[step % len(batches)]
        clock = time.perf_counter()
        lam = precision if state is None else state.prior_precision
        loss = F.cross_entropy(model_fn(theta, batch), batch["labels"]) + prior_penalty(theta, lam, n_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        training += time.perf_counter() - clock
        if update is not None:
            clock = time.perf_counter()
            state = update(state, theta, batch)
            updating += time.perf_counter() - clock
    return training, updating, 0 if state is None else int(state.refreshes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cases", default="mc:10:10,mc:50:50,mc:50:10,exact:50:50",
                        help="comma-separated fisher:every:window")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "online_overhead.json"))
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    model = llama_lora_model(args.hidden, layers=args.layers)
    params = select_params(model, "lora")
    model_fn = ModelFunction(model, params, LastTokenLogits(ANSWER_IDS))
    batches = [token_batch(args.batch, args.seq, seed=k) for k in range(16)]
    cases: dict[str, dict[str, Any] | None] = {"fixed": None}
    for case in args.cases.split(","):
        fisher, every, window = case.split(":")
        cases[f"online-{fisher}-every{every}-window{window}"] = {
            "fisher": fisher,
            "every": int(every),
            "window": int(window),
        }
    overhead: dict[str, list[float]] = {name: [] for name in cases}
    step_seconds: dict[str, list[float]] = {name: [] for name in cases}
    refreshes: dict[str, int] = {}
    train(model_fn, params, batches, 2, None)  # warm-up
    for repeat in range(args.repeats):
        for name, online in cases.items():
            training, updating, count = train(model_fn, params, batches, args.steps, online)
            overhead[name].append(updating / training)
            step_seconds[name].append(training / args.steps)
            refreshes[name] = count
            log(
                f"repeat {repeat}: {name} {training / args.steps:.4f} s/step, online {updating:.2f} s, {count} refreshes"
            )
    records = []
    for name, online in cases.items():
        per_step = statistics.median(step_seconds[name])
        fraction = statistics.median(overhead[name])
        records.append(
            {
                "case": name,
                "training_seconds_per_step": per_step,
                "overhead_fraction": fraction,
                "overhead_seconds_per_step": fraction * per_step,
                "refreshes": refreshes[name],
                "seconds_per_refresh": None
                if not refreshes[name]
                else fraction * per_step * args.steps / refreshes[name],
                **(online or {}),
            }
        )
        log(f"{name}: training {per_step:.4f} s/step, online overhead {fraction:+.1%} of the training time")
    settings = {
        k: getattr(args, k) for k in ("hidden", "layers", "batch", "seq", "steps", "repeats", "threads")
    }
    write_results(Path(args.out), [{"environment": environment(), "settings": settings}, *records])


if __name__ == "__main__":
    main()
