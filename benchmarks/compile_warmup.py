"""Warm-up of the compiled K-FAC update: first-call and later-call times, before and after.

Measures ``torch.compile``-d ``flaplace.build(...).update`` on a random Llama (hidden 256,
``--layers`` decoder layers (default 2), vocabulary 1024, PEFT LoRA r=8 on q/v), batch 8 x 64 tokens,
``fisher="mc"``, ``sharing="expand"``, dense factors: the compiled case of
``kfac_hook_vs_functional.py`` with more layers and shorter sequences.

Variants (each in its own fresh process, with its own empty inductor cache, so every
first call compiles from scratch; ``TORCHINDUCTOR_COMPILE_THREADS=1``, so that the C++
compiler runs as waited-for children and their CPU time is counted):

* ``before``: the flaplace of ``--before`` (default: the commit this branch started
  from, exported with ``git archive``), ``torch.compile(update)``;
* ``after``: this checkout, ``flaplace.compile_update(update)`` (inductor);
* ``after-warm``: ``after`` again in a new process that reuses the previous run's cache
  (what a second run of the same script on the same machine pays);
* ``after-aot_eager`` and ``after-eager``: cheaper backends (``--no-backends`` skips them).

Inductor keeps its precompiled C++ headers outside ``TORCHINDUCTOR_CACHE_DIR`` (under the
system's temporary directory, keyed by the compiler flags), so by default a run reuses the
headers that earlier compilations on this machine built, as every compilation after a
machine's first does. ``--cold-headers`` gives each run its own empty ``TMPDIR`` as well: the
first compilation ever on a machine.

Each worker calls the compiled update on ``--calls`` batches of the same shape and new data
(the state carried over) and reports, per call, the wall time, the CPU time of the process
and of its children (the C++ compiler), and the number of graphs dynamo has compiled so far;
then the median of ``--repeats`` further compiled and eager calls. ``before`` and ``after``
alternate ``--rounds`` times. The machine's load average is recorded with every run: on a
shared machine the wall times follow the load, the CPU times much less.

Usage: ``python benchmarks/compile_warmup.py [--layers 2] [--rounds 1] [--calls 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = common.RESULTS / "compile_warmup.json"
BASE_COMMIT = "9885119"  # main when issue 14 was taken up: the "before" code path
HIDDEN, BATCH, SEQ, VOCAB, RANK = 256, 8, 64, 1024, 8


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def worker(args) -> dict:
    """One variant in this process: the first ``--calls`` compiled calls, then steady-state medians."""
    from torch._dynamo.utils import counters

    import flaplace

    common.quiet()
    torch.set_num_threads(1)
    model = common.llama_lora_model(HIDDEN, layers=args.layers, vocab=VOCAB, rank=RANK)
    params = flaplace.select_params(model, "lora")
    model_fn = flaplace.ModelFunction(model, params, flaplace.LastTokenLogits(common.ANSWER_IDS))
    batches = [common.token_batch(BATCH, SEQ, vocab=VOCAB, seed=1 + k) for k in range(args.calls)]
    init, update = flaplace.build(model_fn, fisher="mc", sharing="expand", lr_threshold=None)
    state = init(params, batches[0])
    backend = args.backend
    if hasattr(flaplace, "compile_update"):
        compiled = flaplace.compile_update(update, backend=backend)
    else:
        compiled = torch.compile(update, backend=backend)
    calls = []
    torch.manual_seed(0)
    for batch in batches:
        cpu0, wall0 = _cpu(), time.perf_counter()
        state = compiled(state, params, batch)
        wall, cpu1 = time.perf_counter() - wall0, _cpu()
        calls.append(
            {
                "wall_s": wall,
                "cpu_s": cpu1[0] - cpu0[0],
                "child_cpu_s": cpu1[1] - cpu0[1],
                "graphs": counters["stats"]["unique_graphs"],
            }
        )
    steady, eager = [], []
    for _ in range(args.repeats):
        for fn, times in ((compiled, steady), (update, eager)):
            start = time.perf_counter()
            state = fn(state, params, batches[-1])
            times.append(time.perf_counter() - start)
    return {
        "calls": calls,
        "compiled_median_s": statistics.median(steady),
        "eager_median_s": statistics.median(eager),
        "flaplace_file": flaplace.__file__,
    }


def _run(variant: str, root: Path, backend: str, cache: Path, args) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=str(root),
        TORCHINDUCTOR_CACHE_DIR=str(cache),
        TORCHINDUCTOR_COMPILE_THREADS="1",
    )
    if args.cold_headers:  # a temporary directory of the run's own: no precompiled headers yet
        tmp = cache.with_name(cache.name + "-tmp")
        tmp.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmp)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, str(SCRIPT), "--worker-output", str(out), "--backend", backend]
    command += ["--layers", str(args.layers), "--calls", str(args.calls), "--repeats", str(args.repeats)]
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{done.stderr[-3000:]}")
    record = json.loads(out.read_text())
    out.unlink()
    record.update(
        variant=variant,
        backend=backend,
        process_s=time.perf_counter() - start,
        loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
    )
    first = record["calls"][0]
    common.log(
        f"{variant:>16}: first call {first['wall_s']:.1f} s wall, "
        f"{first['cpu_s'] + first['child_cpu_s']:.1f} s CPU; later calls "
        + ", ".join(f"{c['wall_s']:.2f}" for c in record["calls"][1:])
        + f" s; graphs {[c['graphs'] for c in record['calls']]}; load {record['loadavg_before'][0]:.1f}"
    )
    return record


def _summary(records: list[dict]) -> dict:
    def med(variant: str, key: str, call: int = 0) -> float | None:
        values = [r["calls"][call].get(key) for r in records if r["variant"] == variant]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    summary: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == variant]
        summary[variant] = {
            "runs": len(runs),
            "first_wall_s": med(variant, "wall_s"),
            "first_cpu_s": statistics.median(
                r["calls"][0]["cpu_s"] + r["calls"][0]["child_cpu_s"] for r in runs
            ),
            "second_wall_s": med(variant, "wall_s", 1),
            "second_cpu_s": statistics.median(
                r["calls"][1]["cpu_s"] + r["calls"][1]["child_cpu_s"] for r in runs
            ),
            "graphs_after_calls": [r["calls"][-1]["graphs"] for r in runs],
            "compiled_median_s": statistics.median(r["compiled_median_s"] for r in runs),
            "eager_median_s": statistics.median(r["eager_median_s"] for r in runs),
        }
    if "before" in summary and "after" in summary:
        b, a = summary["before"], summary["after"]
        summary["first_call_speedup_wall"] = b["first_wall_s"] / a["first_wall_s"]
        summary["first_call_speedup_cpu"] = b["first_cpu_s"] / a["first_cpu_s"]
        summary["second_call_speedup_wall"] = b["second_wall_s"] / a["second_wall_s"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternating before/after cold runs")
    parser.add_argument("--calls", type=int, default=3, help="compiled calls with new data of one shape")
    parser.add_argument("--repeats", type=int, default=5, help="steady-state calls after the warm-up")
    parser.add_argument("--before", default=BASE_COMMIT, help="git revision of the 'before' flaplace")
    parser.add_argument("--no-backends", action="store_true", help="skip the aot_eager and eager rows")
    parser.add_argument(
        "--cold-headers", action="store_true", help="an empty TMPDIR per run: no precompiled C++ headers"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_output:
        Path(args.worker_output).write_text(json.dumps(worker(args)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="flaplace-compile-"))
    before: Path | None = scratch / "before"
    before.mkdir()
    archive = subprocess.run(
        ["git", "archive", args.before, "flaplace"], cwd=common.ROOT, capture_output=True
    )
    if archive.returncode == 0:
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
    else:  # e.g. a shallow clone without that commit
        common.log(f"no 'before' row: git archive {args.before} failed: {archive.stderr.decode().strip()}")
        before = None
    records = []
    for k in range(args.rounds):
        for variant, root in (("before", before), ("after", common.ROOT)):
            if root is None:
                continue
            records.append(_run(variant, root, "inductor", scratch / f"cache-{variant}-{k}", args))
    records.append(
        _run("after-warm", common.ROOT, "inductor", scratch / f"cache-after-{args.rounds - 1}", args)
    )
    if not args.no_backends:
        for backend in ("aot_eager", "eager"):
            records.append(_run(f"after-{backend}", common.ROOT, backend, scratch / f"cache-{backend}", args))
    result = {
        "setup": {
            "model": f"Llama hidden {HIDDEN}, {args.layers} layers, vocabulary {VOCAB}, LoRA r={RANK} on q/v",
            "batch": BATCH,
            "seq": SEQ,
            "kfac": "fisher=mc, sharing=expand, dense factors",
            "before": args.before,
            "calls": args.calls,
            "compile_threads": 1,
            "precompiled_headers": "cold (empty TMPDIR per run)" if args.cold_headers else "shared",
            **common.environment(),
        },
        "summary": _summary(records),
        "records": records,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(common._rounded(result), indent=1) + "\n")
    common.log(f"wrote {args.output}")
    print(json.dumps(common._rounded(result["summary"]), indent=1))


if __name__ == "__main__":
    main()
