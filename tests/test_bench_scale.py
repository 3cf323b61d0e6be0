"""The scale benchmark's smoke mode runs and writes records of the documented schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"forward_backward", "kfac_lowrank", "kfac_dense", "evidence", "prior_tuning", "predictive"}
METHODS = {"flaplace", "bayesian-lora", "laplace-torch", "forward+backward"}


@pytest.mark.slow
def test_scale_quick_writes_records(tmp_path: Path) -> None:
    pytest.importorskip("bayesian_lora")
    pytest.importorskip("peft")
    output = tmp_path / "scale.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "scale.py"),
        "--quick",
        "--configs",
        "quick-all",
        "--no-compile",
        "--no-memory",
        "--output",
        str(output),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, env=env, check=True, timeout=300, cwd=ROOT, capture_output=True)
    records = json.loads(output.read_text())
    assert records
    for r in records:
        assert {"config", "method", "stage", "compiled", "median_s", "peak_mb"} <= set(r)
        assert r["method"] in METHODS and r["stage"] in STAGES
        assert r["config"] == "quick-all" and r["compiled"] is False
        assert "error" not in r, r["error"]
        assert r["median_s"] > 0
    assert {r["stage"] for r in records} == STAGES
    assert {(r["method"], r["stage"]) for r in records} >= {
        ("flaplace", "kfac_lowrank"),
        ("bayesian-lora", "kfac_lowrank"),
        ("forward+backward", "forward_backward"),
    }
