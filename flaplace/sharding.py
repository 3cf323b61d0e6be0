"""Refusing models whose weights are sharded over processes (FSDP, ``fully_shard``, DTensor)."""

from __future__ import annotations

import sys

from torch import nn


def refuse_sharded(model: nn.Module) -> None:
    """Refuse a model whose weights are sharded over processes (FSDP, ``fully_shard``, DTensor).

    flaplace swaps full weight tensors into the module (``functional_call``) and finds each
    adapted layer's inputs and output gradients by the identity of its weight. FSDP
    (``FullyShardedDataParallel``, whose weights are flattened into one ``FlatParameter``) and
    FSDP2 / tensor parallelism (``fully_shard``, whose weights are ``DTensor`` shards) keep only a
    shard of each weight on a rank and gather it inside their own forward, so neither holds.
    Data parallelism covers the use: the adapters are small, so every rank can hold the whole
    model, and ``fit_kfac(..., distributed=True)`` sums each rank's shard of the data.

    Raises:
        ValueError: naming the sharded module or parameter and what to do instead.

    Examples:
        >>> refuse_sharded(nn.Linear(2, 2))  # plain weights: nothing to refuse
    """
    # A model can only be sharded once these modules are imported: no import (and its cost) otherwise.
    fsdp, tensor = sys.modules.get("torch.distributed.fsdp"), sys.modules.get("torch.distributed.tensor")
    wrappers = tuple(getattr(fsdp, n) for n in ("FullyShardedDataParallel", "FSDPModule") if hasattr(fsdp, n))
    dtensor = getattr(tensor, "DTensor", None)
    advice = (
        "flaplace needs every adapted weight whole on every rank (it swaps full weights into the "
        "model and finds each layer by its weight); load the model unsharded on each rank (or "
        "wrap it in DistributedDataParallel) and shard the data instead: fit_kfac(..., distributed=True)"
    )
    for name, module in model.named_modules():
        if wrappers and isinstance(module, wrappers):
            where = f"module {name!r}" if name else "the model"
            raise ValueError(f"{where} is FSDP-sharded ({type(module).__name__}): {advice}")
    for name, param in model.named_parameters():
        if dtensor is not None and isinstance(param, dtensor):
            raise ValueError(f"parameter {name!r} is a sharded DTensor: {advice}")
