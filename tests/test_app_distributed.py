"""``flaplace run`` on several processes (gloo on CPU) gives the single-process results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from app_dist_worker import run_rank
from safetensors.torch import load_file
from tiny_hf import TARGETS, save_tiny_model, write_demo_files

from flaplace.app.config import STAGES, RunConfig
from flaplace.app.distributed import (
    SINGLE,
    Ranks,
    RankStages,
    launched_ranks,
    rank_device,
    rank_seed,
    rows,
    shard,
    start,
)
from flaplace.app.pipeline import run
from flaplace.posterior_io import load_posterior


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    return {"model": save_tiny_model("llama", root / "model"), "data": write_demo_files(root / "demo")}


def options(setup, out: Path, **overrides) -> dict:
    """A tiny run whose work splits unevenly: 24/8/8 examples, batches of 5 (MAP) and 3 (the rest)."""
    values = {
        "model": str(setup["model"]),
        "task": "demo",
        "data_path": str(setup["data"]),
        "lora_rank": 2,
        "lora_alpha": 4.0,
        "lora_targets": TARGETS["llama"],
        "steps": 5,
        "lr": 1e-2,
        "batch_size": 5,
        "eval_batch_size": 3,
        "max_length": 48,
        "fisher": "exact",
        "lr_threshold": None,
        "prior_tuning": "default-val",
        "dtype": "float64",
        "output_dir": str(out),
    }
    values.update(overrides)
    return values


def test_two_processes_give_the_single_process_run(setup, tmp_path):
    """MAP (data parallel), K-FAC (sharded, all-reduced), default-val prior (sharded validation) and
    predictive (sharded test set, gathered) equal one process's run to round-off; a resumed
    run gives every rank the stored stages."""
    alone = run(RunConfig(**options(setup, tmp_path / "alone")), progress=False)
    together_dir = tmp_path / "together"
    mp.spawn(
        run_rank,
        args=(2, str(tmp_path / "store"), options(setup, together_dir), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    (first, again), (other, other_again) = (
        json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)
    )
    assert first["processes"] == 2
    assert first["stages"] == other["stages"] == dict.fromkeys(STAGES, "computed")
    # resumed: rank 0 loads every stage and sends it; rank 1 never reads the folder
    assert again["stages"] == other_again["stages"] == dict.fromkeys(STAGES, "loaded")
    for key in ("metrics", "prior_precision", "prior_tuning", "log_evidence", "train_log_likelihood"):
        for result in (other, again, other_again):
            assert result[key] == first[key], key  # every rank holds the same result
    together = first
    assert together["prior_precision"] == alone["prior_precision"]
    assert math.isclose(together["log_evidence"], alone["log_evidence"], rel_tol=1e-9)
    assert math.isclose(together["train_log_likelihood"], alone["train_log_likelihood"], rel_tol=1e-9)
    # the MAP reports its NLL in float32 (summed per rank here, averaged by cross_entropy there)
    assert math.isclose(together["final_train_nll"], alone["final_train_nll"], rel_tol=1e-6)
    for a, b in zip(alone["prior_tuning"]["table"], together["prior_tuning"]["table"], strict=True):
        assert math.isclose(a["nll"], b["nll"], rel_tol=1e-9), (a, b)
    # the Akaike weight counts every rank's validation examples
    weight = alone["prior_tuning"]["scaling_weight"]
    assert 0 < weight < 1 and math.isclose(together["prior_tuning"]["scaling_weight"], weight, rel_tol=1e-9)
    for method in ("map", "laplace"):
        for metric, value in alone["metrics"][method].items():
            assert math.isclose(together["metrics"][method][metric], value, rel_tol=1e-9, abs_tol=1e-12)
    # only rank 0 wrote, and what it wrote matches the single-process files
    assert (together_dir / "results.json").is_file() and not list(tmp_path.glob("together/.*.tmp-*"))
    first, second = (load_posterior(d / "posterior.safetensors") for d in (tmp_path / "alone", together_dir))
    assert first.mean.keys() == second.mean.keys() and len(first.mean) == 8
    for name in first.mean:
        assert torch.allclose(second.mean[name], first.mean[name], rtol=1e-9, atol=1e-12), name
        for side in ("S", "A"):
            a, b = (getattr(p.factors[name], side).dense() for p in (first, second))
            assert torch.allclose(b, a, rtol=1e-9, atol=1e-12), (name, side)
    predictive = [
        load_file(str(d / "checkpoints" / "predictive.safetensors"))
        for d in (tmp_path / "alone", together_dir)
    ]
    for key in ("f_mu", "f_var"):
        assert predictive[0][key].shape[0] == 8
        assert torch.allclose(predictive[1][key], predictive[0][key], rtol=1e-9, atol=1e-12), key
    assert torch.equal(predictive[1]["labels"], predictive[0]["labels"])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_rank_whose_peer_fails_or_hangs_stops_instead_of_waiting():
    """Launched as torchrun would (environment only): rank 1 exits, or stays alive without ever
    joining rank 0's all-reduce; rank 0 fails within FLAPLACE_DIST_TIMEOUT_S, not never."""
    worker = Path(__file__).with_name("app_dist_worker.py")
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for role in ("crash", "hang"):
        env = {
            **os.environ, "PYTHONPATH": str(root), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()), "FLAPLACE_DIST_TIMEOUT_S": "10", "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        runs[role] = [
            subprocess.Popen(
                [sys.executable, str(worker), role],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in (0, 1)
        ]
    try:
        for pair in runs.values():
            for process in pair:
                assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        for pair in runs.values():
            for process in pair:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
        for role, (first, _) in runs.items():
            out, err = first.communicate(timeout=180)
            assert first.returncode == 1, err[-2000:]
            report = json.loads(out.strip().splitlines()[-1])
            assert report["error"] == "RuntimeError"
            if role == "hang":  # the timeout, not the peer's exit, ended the wait
                assert 9 < report["seconds"] < 120 and "Timed out" in report["message"]
            else:
                assert report["seconds"] < 120 and "closed by peer" in report["message"]
    finally:
        for pair in runs.values():
            for process in pair:
                process.kill()
                process.communicate()


def test_launcher_environment():
    assert launched_ranks({}) == SINGLE
    assert launched_ranks({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == Ranks(2, 4, 0)
    assert launched_ranks({"RANK": "1", "WORLD_SIZE": "2"}) == Ranks(1, 2, 1)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match="RANK"):
            launched_ranks(bad)
    assert start("cpu", environ={"WORLD_SIZE": "1"}) == (SINGLE, False)


def test_each_rank_gets_its_own_device():
    two = Ranks(1, 2, 1)
    assert rank_device("cuda", two) == "cuda:1"
    assert rank_device("cpu", two) == "cpu"
    assert rank_device("cuda:3", SINGLE) == "cuda:3"
    with pytest.raises(ValueError, match="--device cuda"):
        rank_device("cuda:0", two)
    with pytest.raises(ValueError, match="mps"):
        rank_device("mps", two)


def test_shards_cover_the_items_in_order_and_rows_split_batches():
    for n in (3, 7, 8):
        items = list(range(n))
        parts = [shard(items, Ranks(r, 3, r)) for r in range(3)]
        assert sum(parts, []) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="2 test batches for 3 processes"):
        shard([0, 1], Ranks(0, 3, 0), "test batches")
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.arange(5)}
    split = [rows(batch, Ranks(r, 2, r)) for r in (0, 1)]
    assert torch.equal(torch.cat([s["input_ids"] for s in split]), batch["input_ids"])
    assert [len(s["labels"]) for s in split] == [3, 2]
    assert rank_seed(7, SINGLE) == 7 and rank_seed(7, Ranks(1, 2, 1)) != 7


def test_one_process_stages_are_the_checkpoint_cache(tmp_path):
    stages = RankStages(tmp_path, SINGLE, "cpu")
    assert stages.get("prior", "k", lambda: (None, {"p": 1}))[1] == {"p": 1}
    assert stages.get("prior", "k", lambda: (None, {"p": 2}))[1]["p"] == 1
    assert stages.status == {"prior": "loaded"}


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(setup, tmp_path):
    """``torchrun --nproc-per-node 2 -m flaplace run`` writes the results of ``flaplace run``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    args = []
    for key, value in options(setup, tmp_path).items():
        if key != "output_dir":
            args += [f"--{key.replace('_', '-')}", str(value) if value is not None else "none"]
    args[args.index("--lora-targets") + 1] = ",".join(TARGETS["llama"])
    one = [sys.executable, "-m", "flaplace", "run", *args, "--quiet", "--output-dir", str(tmp_path / "one")]
    many = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "flaplace", "run", *args, "--quiet", "--output-dir", str(tmp_path / "many"),
    ]  # fmt: skip
    for command in (one, many):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("accuracy") == 1  # only rank 0 prints the table
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "many"))
    assert b["processes"] == 2 and a["processes"] == 1
    assert b["prior_precision"] == a["prior_precision"]
    for method in ("map", "laplace"):
        for metric, value in a["metrics"][method].items():
            assert math.isclose(b["metrics"][method][metric], value, rel_tol=1e-9, abs_tol=1e-12)
