"""LoRA adapters on Hugging Face models: attaching them, and naming the weights the posterior covers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from flaplace.app.hf import LoadedModel


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers of ``model`` (``nn.Linear`` and GPT-2 ``Conv1D``).

    Examples:
        >>> linear_module_names(bert)
        ['query', 'key', 'value', 'dense', 'classifier']
    """
    names: list[str] = []
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            leaf = full.rpartition(".")[2]
            if leaf and leaf not in names:
                names.append(leaf)
    return names


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the architecture of ``model`` (its ``config.model_type``).

    The table is PEFT's own (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``): e.g.
    ``q_proj, v_proj`` for Llama, Qwen2 and Mistral, ``query, value`` for BERT, ``c_attn`` for GPT-2.

    Raises:
        ValueError: an architecture PEFT has no default for (listing the model's linear layers).

    Examples:
        >>> default_targets(llama)
        ['q_proj', 'v_proj']
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TABLE:
        raise ValueError(
            f"PEFT has no default LoRA targets for model type {model_type!r}; pass --lora-targets with "
            f"some of its linear layers: {', '.join(linear_module_names(model))}"
        )
    return list(TABLE[model_type])


def attach_lora(
    loaded: LoadedModel,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    last_layers: int | None = None,
) -> nn.Module:
    """Wrap ``loaded.model`` with PEFT LoRA adapters on the linear layers named ``targets``.

    ``targets=None`` (or empty) takes PEFT's default for the architecture (`default_targets`).

    For ``seq_cls`` models the classification head is trained too
    (PEFT ``modules_to_save``). Targets are checked first: every name must be the
    leaf name of at least one linear layer.

    ``last_layers=N`` puts adapters only in the last ``N`` transformer blocks (PEFT
    ``layers_to_transform``), which cuts the cost of training, K-FAC and the predictive
    on a deep model; ``None`` adapts every block.

    Raises:
        ValueError: a bad rank/alpha, a target that names no linear layer or an
            architecture without default targets (the message lists the linear layers the
            model has), or ``last_layers`` larger
            than the model's number of blocks.

    Examples:
        >>> peft_model = attach_lora(loaded, rank=8, alpha=16, targets=["query", "value"])
        >>> peft_model = attach_lora(loaded, rank=8, alpha=16, targets=["q_proj", "v_proj"], last_layers=8)
    """
    import peft

    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA rank must be at least 1 and alpha positive, got rank={rank}, alpha={alpha}")
    targets = list(targets or default_targets(loaded.model))
    available = linear_module_names(loaded.model)
    if loaded.head is not None:
        available = [n for n in available if n != loaded.head]
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(
            f"LoRA target module(s) {missing} match no linear layer of {type(loaded.model).__name__}; "
            f"its linear layers are named: {', '.join(available)}"
        )
    layers: list[int] | None = None
    if last_layers is not None:
        n_blocks = getattr(loaded.model.config, "num_hidden_layers", None)
        if not isinstance(n_blocks, int):
            raise ValueError(
                f"lora_layers: cannot tell how many blocks {type(loaded.model).__name__} has; use lora_layers none"
            )
        if not 1 <= last_layers <= n_blocks:
            raise ValueError(
                f"lora_layers must be between 1 and {n_blocks} (the model's blocks), got {last_layers}"
            )
        layers = list(range(n_blocks - last_layers, n_blocks))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT scales by alpha / r; a float works
        lora_dropout=dropout,
        target_modules=targets,
        layers_to_transform=layers,
        modules_to_save=[loaded.head] if loaded.head else None,
        fan_in_fan_out=any(
            _is_conv1d(m) for n, m in loaded.model.named_modules() if n.rpartition(".")[2] in targets
        ),
    )
    return peft.get_peft_model(loaded.model, config)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def laplace_param_names(model: nn.Module) -> list[str]:
    """Names of the weights the Laplace posterior covers: LoRA matrices and a trained head's weight.

    Only matrices (2-D) are blocks; a trained head's bias is fitted at the MAP but not
    part of the posterior.

    Examples:
        >>> laplace_param_names(peft_model)[:2]
        ['base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight', ...]
    """
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.ndim == 2 and ("lora_" in n or "modules_to_save" in n)
    ]


def trainable_param_names(model: nn.Module) -> list[str]:
    """Names of every trainable parameter (LoRA matrices, a trained head's weight and bias).

    Examples:
        >>> trainable_param_names(peft_model)[-1]
        'base_model.model.classifier.modules_to_save.default.bias'
    """
    return [n for n, p in model.named_parameters() if p.requires_grad]
