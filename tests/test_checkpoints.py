"""flaplace.app.checkpoints: a run killed in the middle of a stage resumes with nothing lost or half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_hf import TARGETS, save_tiny_model, write_demo_files

from flaplace.app import cli
from flaplace.app.checkpoints import TMP_INFIX, StageCache, atomic_path

REPO = Path(__file__).resolve().parents[1]


def test_stage_cache_reuses_only_a_matching_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": 1}, {"n": len(calls)}

    cache = StageCache(tmp_path)
    save = lambda path, value: path.write_text(json.dumps(value))  # noqa: E731
    load = lambda path: json.loads(path.read_text())  # noqa: E731
    assert cache.get("s", "k1", compute, save=save, load=load) == ({"x": 1}, {"n": 1})
    assert StageCache(tmp_path).get("s", "k1", compute, save=save, load=load)[1]["n"] == 1
    assert StageCache(tmp_path).get("s", "k2", compute, save=save, load=load)[1]["n"] == 2
    (tmp_path / "s.safetensors").unlink()  # marker without data: recomputed
    again = StageCache(tmp_path)
    assert again.get("s", "k2", compute, save=save, load=load)[1]["n"] == 3 and again.status == {
        "s": "computed"
    }


def test_a_failed_write_leaves_no_file_and_stale_temporaries_are_removed(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ZeroDivisionError
    assert not target.exists() and not list(tmp_path.iterdir())
    stale = tmp_path / f".map.safetensors{TMP_INFIX}12345"
    stale.write_text("half-written by a killed run")
    StageCache(tmp_path)
    assert not stale.exists()


def _kill_when(command: list[str], marker: str, delay: float) -> str:
    """Start ``command``; SIGKILL it ``delay`` s after ``marker`` appears on its stderr."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 300
    while marker.encode() not in seen and time.monotonic() < deadline:
        chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            break
        seen += chunk
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert marker.encode() in seen, seen.decode(errors="replace")[-2000:]
    return seen.decode(errors="replace")


def test_killed_in_a_stage_resumes_with_nothing_lost(tmp_path, capsys):
    model = save_tiny_model("gpt2", tmp_path / "gpt2")
    data = write_demo_files(tmp_path / "demo", n=(600, 8, 8))
    out = tmp_path / "out"
    args = [
        "run", "--model", str(model), "--task", "demo", "--data-path", str(data), "--lora-rank", "2",
        "--lora-targets", ",".join(TARGETS["gpt2"]), "--steps", "1000", "--batch-size", "4", "--max-length", "32",
        "--eval-batch-size", "2", "--lr-threshold", "12", "--n-kfac", "4", "--output-dir", str(out), "--threads", "1",
    ]  # fmt: skip
    command = [sys.executable, "-m", "flaplace", *args]
    checkpoints = out / "checkpoints"

    # killed during the MAP: nothing of the stage is kept, no result appears
    # (killed as soon as the stage's progress bar appears: a fixed delay raced a fast machine,
    # where the tiny MAP could finish first)
    _kill_when(command, "MAP fine-tuning", 0.0)
    assert not (checkpoints / "map.json").exists() and not (out / "results.json").exists()

    # killed during K-FAC: the MAP is kept, K-FAC is not
    _kill_when(command, "K-FAC", 0.0)
    assert (checkpoints / "map.json").is_file() and (checkpoints / "map.safetensors").is_file()
    assert not (checkpoints / "kfac.json").exists() and not (out / "results.json").exists()
    map_bytes = (checkpoints / "map.safetensors").read_bytes()

    # the resumed run reuses the MAP, recomputes the rest and leaves no temporary file
    assert cli.main([*args, "--quiet"]) == 0
    assert "reused checkpoints: map; computed: kfac, prior, predictive" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["map"] == "loaded" and results["stages"]["kfac"] == "computed"
    assert (checkpoints / "map.safetensors").read_bytes() == map_bytes
    assert not [p for p in out.rglob("*") if TMP_INFIX in p.name]
    assert all(json.loads((checkpoints / f"{s}.json").read_text())["key"] for s in results["stages"])
