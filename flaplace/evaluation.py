"""The model as a plain function while flaplace evaluates it: training-time machinery switched off, then restored.

A model handed over after training often still carries what training set on it:

* **mixed precision**: accelerate (under ``transformers.Trainer`` and TRL with ``bf16=True`` or
  ``fp16=True``) replaces ``model.forward`` with an autocast wrapper that also converts the
  outputs to float32, and keeps the original as ``model._original_forward``;
* **gradient checkpointing**: Hugging Face layers with ``gradient_checkpointing = True``;
* **the input-require-grads hook**: ``enable_input_require_grads()`` (called by TRL, PEFT or
  Trainer with gradient checkpointing) registers a forward hook on the input embeddings that
  calls ``output.requires_grad_()``, which ``torch.func`` transforms refuse;
* **training mode**: dropout and other training-mode layers;
* **QLoRA on CPU**: bitsandbytes 4-bit layers pack their weights for a bfloat16 CPU kernel at the
  first forward without gradients in eval mode; that kernel has no backward, so every Jacobian
  through the layer would be silently zero.

`plain_evaluation` switches these off for the duration of one call and puts back exactly
what was there: flaplace's model function is the model's own, in the dtype of its weights,
deterministic and differentiable by every Jacobian method. Nothing is registered on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["plain_evaluation"]

#: Device types whose autocast flaplace refuses to run under.
_AUTOCAST_DEVICES: tuple[str, ...] = ("cpu", "cuda", "xpu", "mps")


class _KeepRequiresGrad(TorchFunctionMode):
    """Skips ``Tensor.requires_grad_`` (what the input-require-grads hook calls) inside the forward.

    flaplace differentiates with respect to the selected weights only: whether the embedding
    output requires grad changes no value or derivative it computes, while the call itself
    fails under ``torch.func`` transforms.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.requires_grad_:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def plain_evaluation(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Evaluate ``model`` without its training-time machinery; everything is restored on exit.

    Inside the block:

    * accelerate's mixed-precision forward (``model._original_forward`` kept by
      ``Accelerator.prepare``) is replaced by the original forward: the model runs in the dtype
      of its weights. That dtype is the one place precision is chosen (load or cast the model
      in ``bfloat16`` to evaluate in it); a call inside ``torch.autocast`` is refused, since
      the curvature and Jacobians around the model would silently run in lower precision;
    * modules with ``gradient_checkpointing = True`` (Hugging Face layers) have it ``False``;
    * ``Tensor.requires_grad_`` calls made by forward hooks (``enable_input_require_grads``)
      are skipped, when any module has a forward hook; the hooks themselves stay registered;
    * with ``eval_mode=True``, modules in training mode are in eval mode (dropout off);
    * bitsandbytes 4-bit layers do not pack their weights for the CPU inference kernel
      (``support_avx512bf16_for_cpu`` is ``False``), whose output has no gradient.

    On exit the forward, the checkpointing flags and the modes are put back as they were,
    also when the block raises.

    Args:
        model: the module that holds the weights (see [`unwrap_model`][flaplace.sharding.unwrap_model]).
        eval_mode: switch training-mode modules to eval mode inside the block.

    Returns:
        A context manager that yields ``model``.

    Raises:
        RuntimeError: called inside an enabled ``torch.autocast``, or a bitsandbytes 4-bit
            weight is already packed for the CPU inference kernel.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with plain_evaluation(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    training: list[nn.Module] = []
    checkpointing: list[nn.Module] = []
    forwards: list[tuple[nn.Module, object]] = []
    packing: list[nn.Module] = []
    for device in _AUTOCAST_DEVICES:
        if _autocast_enabled(device):
            raise RuntimeError(
                f"flaplace was called inside torch.autocast ({device}); it evaluates the model in the "
                "dtype of its weights: call it outside the autocast block (to evaluate in bfloat16, "
                "cast the model, e.g. model.to(torch.bfloat16))"
            )
    hooked = False
    for module in model.modules():
        if eval_mode and module.training:
            training.append(module)
        state = module.__dict__  # plain attributes: no nn.Module.__getattr__ search per module
        if state.get("gradient_checkpointing") is True:
            checkpointing.append(module)
        if state.get("_original_forward") is not None and "forward" in state:
            forwards.append((module, state["forward"]))
        hooked = hooked or bool(module._forward_hooks)
        if "support_avx512bf16_for_cpu" in state:  # a bitsandbytes 4-bit layer
            _refuse_packed_4bit(module)
            if module.support_avx512bf16_for_cpu:
                packing.append(module)
    with contextlib.ExitStack() as stack:
        for module in training:
            module.training = False
        stack.callback(_set_all, training, "training", True)
        for module in checkpointing:
            module.gradient_checkpointing = False  # type: ignore[assignment]
        stack.callback(_set_all, checkpointing, "gradient_checkpointing", True)
        for module, wrapped in forwards:
            module.__dict__["forward"] = module.__dict__["_original_forward"]
            stack.callback(module.__dict__.__setitem__, "forward", wrapped)
        for module in packing:
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
        stack.callback(_set_all, packing, "support_avx512bf16_for_cpu", True)
        if hooked:
            stack.enter_context(_KeepRequiresGrad())
        yield model


def _set_all(modules: list[nn.Module], attribute: str, value: bool) -> None:
    for module in modules:
        setattr(module, attribute, value)


def _autocast_enabled(device: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device))
    except (RuntimeError, TypeError):  # a device type this torch does not know
        return False


def _refuse_packed_4bit(module: nn.Module) -> None:
    """Refuse a bitsandbytes 4-bit layer whose weight is packed for its CPU inference kernel (no gradient)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError(
            f"the 4-bit weight of a {type(module).__name__} was packed by bitsandbytes for its CPU "
            "inference kernel (by a forward without gradients in eval mode), which gives no gradient: "
            "set support_avx512bf16_for_cpu = False on every bitsandbytes Linear4bit right after "
            "loading, or reload the model"
        )
