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
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peers_agreement import agreement  # noqa: E402
from peers_common import (  # first: puts flaplace and tests/ on sys.path
    DEFAULT_DATA,
    RESULTS,
    SEED,
    environment,  # noqa: E402
)
from peers_cost import _merge_cost, cost  # noqa: E402
from peers_quality import QUALITY_TASKS, quality  # noqa: E402
from peers_report import make_plots, markdown_tables  # noqa: E402

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
