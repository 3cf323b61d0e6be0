"""FSDP-sharded models are refused early, with the reason and what to do instead."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flaplace.params import ModelFunction, select_params, unwrap_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group on CPU: enough for FSDP and fully_shard to build their wrappers."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _refused(model: nn.Module, match: str) -> None:
    for build in (lambda: select_params(model, "weight"), lambda: ModelFunction(model, ["0.weight"])):
        with pytest.raises(ValueError, match=match) as info:
            build()
        message = str(info.value)
        assert "\n" not in message
        assert "distributed=True" in message and "whole on every rank" in message


def test_fsdp_wrapper_is_refused(one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings():  # one process: FSDP switches to NO_SHARD and says so
        warnings.simplefilter("ignore", UserWarning)
        wrapped = FullyShardedDataParallel(_net(), device_id=torch.device("cpu"))
    _refused(wrapped, r"the model is FSDP-sharded \(FullyShardedDataParallel\)")


def test_fsdp_inside_a_plain_module_is_refused(one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net[2] = FullyShardedDataParallel(net[2], device_id=torch.device("cpu"))
    _refused(net, r"module '2' is FSDP-sharded")


def test_fully_shard_is_refused(one_process_group):
    from torch.distributed.fsdp import fully_shard

    net = _net()
    fully_shard(net)
    _refused(net, r"FSDP-sharded \(FSDPSequential\)")


def test_dtensor_weights_without_fsdp_are_refused(one_process_group):
    """Tensor parallelism (or any DTensor weight) is refused by the parameter, not the wrapper."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    net = _net()
    mesh = init_device_mesh("cpu", (1,))
    net[0].weight = nn.Parameter(distribute_tensor(net[0].weight.detach(), mesh, [Shard(0)]))
    _refused(net, r"parameter '0.weight' is a sharded DTensor")


def test_plain_and_ddp_models_are_not_refused(one_process_group):
    net = _net()
    ddp = nn.parallel.DistributedDataParallel(net)
    assert unwrap_model(ddp) is net
    assert list(select_params(ddp, "weight")) == ["0.weight", "2.weight"]
