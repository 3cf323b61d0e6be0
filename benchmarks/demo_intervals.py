"""Paired bootstrap intervals of ``flaplace demo``'s rows, read back from its output folder.

The demo prints NLL, ECE and Brier per row; this script recomputes each row's test probabilities
from the cached predictive (``checkpoints/predictive.safetensors`` of both runs and the tuning
records of ``results.json``) and prints, as a Markdown table, the NLL differences against MAP and
against temperature scaling with paired bootstrap 95% intervals (2,000 resamples of the test
examples, `flaplace.app.stats.paired_bootstrap`). The summary in ``docs/results.md`` is its output.

Usage::

    python -m flaplace demo                                   # writes outputs/demo
    PYTHONPATH=$PWD python benchmarks/demo_intervals.py outputs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from flaplace.app import stats  # noqa: E402
from flaplace.app.cli import VALIDATION_PRIOR_DIR  # noqa: E402
from flaplace.app.stages import run_probs  # noqa: E402


def laplace_probs(run: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``(probs, f_mu, labels, results)`` of one run's Laplace row, as the pipeline computes them."""
    results = json.loads((run / "results.json").read_text())
    saved = load_file(str(run / "checkpoints" / "predictive.safetensors"))
    f_mu, f_var, labels, config = saved["f_mu"], saved["f_var"], saved["labels"], results["config"]
    probs = run_probs(
        f_mu, f_var, results, link=config["link"], n_samples=config["n_samples"], seed=config["seed"]
    )
    nll = float(-probs[torch.arange(len(labels)), labels].log().mean())
    assert abs(nll - results["metrics"]["laplace"]["nll"]) < 1e-9, "not the run's own predictive"
    return probs, f_mu, labels, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default="outputs/demo")
    out = Path(parser.parse_args(argv).output_dir)
    default, f_mu, labels, first = laplace_probs(out)
    default_val, _, _, second = laplace_probs(out / VALIDATION_PRIOR_DIR)
    rows = {
        "MAP": torch.softmax(f_mu.double(), -1),
        "temperature scaling": torch.softmax(f_mu.double() / second["temperature_scaling"], -1),
        "`default`": default,
        "`default-val`": default_val,
    }
    print("| | NLL | against MAP | against temperature scaling |\n|---|---|---|---|")
    for name, probs in rows.items():
        cells = [f"{float(-probs[torch.arange(len(labels)), labels].log().mean()):.4f}"]
        for ref in ("MAP", "temperature scaling"):
            if ref == name or (ref != "MAP" and name == "MAP"):
                cells.append("")
                continue
            found = stats.paired_bootstrap(probs, rows[ref], labels, metrics=("nll",), seed=0)["nll"]
            cells.append(f"{found['diff']:+.3f} [{found['ci95'][0]:+.3f}, {found['ci95'][1]:+.3f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
