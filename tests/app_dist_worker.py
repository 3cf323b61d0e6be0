"""A worker for the multi-process pipeline tests, kept light so that spawned processes start fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def run_rank(rank: int, world: int, store: str, options: dict[str, Any], out: str) -> None:
    """``pipeline.run`` twice on one rank of a gloo group (the second run resumes every stage);
    each rank writes the results both runs returned to ``<out>/rank<r>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from flaplace.app.config import RunConfig
        from flaplace.app.pipeline import run

        results = [run(RunConfig(**options), progress=False) for _ in range(2)]
        Path(out, f"rank{rank}.json").write_text(json.dumps(results, default=str))
    finally:
        dist.destroy_process_group()


def _peer_failure(role: str) -> None:
    """Rank 1 leaves (``crash``) or stops answering (``hang``); rank 0's collective must fail, not hang.

    Launched as ``python app_dist_worker.py crash|hang`` with the launcher's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``FLAPLACE_DIST_TIMEOUT_S``).
    """
    import sys
    import time

    from flaplace.app.distributed import all_sum, start, stop

    print("ready", flush=True)  # imported: the test starts both ranks together (the timeout also
    sys.stdin.readline()  # bounds the rendezvous, and imports on a busy machine can take longer)
    ranks, started = start("cpu")
    if ranks.rank == 1:
        if role == "hang":
            time.sleep(120)
        sys.exit(3)
    began = time.perf_counter()
    try:
        all_sum(torch.ones(1))
    except Exception as error:  # what a launcher or the command line would report
        seconds = time.perf_counter() - began
        print(json.dumps({"error": type(error).__name__, "seconds": seconds, "message": str(error)[:300]}))
        sys.exit(1)
    finally:
        stop(started)
    sys.exit(0)


if __name__ == "__main__":
    import sys

    _peer_failure(sys.argv[1])
