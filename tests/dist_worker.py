"""A worker for the two-process test, kept light so that spawned processes start fast."""

from __future__ import annotations

import torch
import torch.distributed as dist

from flaplace.kfac import fit
from flaplace.params import ModelFunction, select_params


def _mlp_problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(40, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    params = select_params(net, "weight")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 40, dtype=torch.float64, generator=g),) for n in (5, 4, 6, 3)]
    return params, ModelFunction(net, params, lambda out, batch: out), data


# n_kfac + oversample = 20 >= the 18 examples: no truncation, so the sums must agree exactly.
OPTIONS = dict(fisher="exact", lr_threshold=30, n_kfac=10, progress=False)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        params, model_fn, data = _mlp_problem()
        shard = data[rank::world]
        factors, _ = fit(model_fn, params, shard, distributed=True, **OPTIONS)
        if rank == 0:
            torch.save(factors, out)
    finally:
        dist.destroy_process_group()


def _dense(e):
    return e.dense()
