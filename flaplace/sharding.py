"""Wrapped and sharded models: the module that holds the weights, and the refusal of sharded ones (FSDP, ``fully_shard``, DTensor)."""

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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the weights: ``model`` without DDP/DataParallel or ``torch.compile`` wrappers.

    ``DistributedDataParallel`` and ``DataParallel`` keep the model as ``.module`` and
    ``torch.compile`` as ``._orig_mod``; their own forward (buffer broadcasts, gradient
    buckets, guards) is not part of the function and fails under ``torch.func`` transforms,
    so flaplace evaluates the wrapped module itself (the weights are the same tensors).
    A model sharded over processes is refused ([`refuse_sharded`][flaplace.sharding.refuse_sharded]).

    Raises:
        ValueError: the model is FSDP-sharded or holds DTensor weights.

    Examples:
        >>> unwrap_model(DistributedDataParallel(model)) is model  # doctest: +SKIP
        True
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            refuse_sharded(model)
            return model
