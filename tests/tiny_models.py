"""Tiny, randomly initialised Hugging Face models with PEFT LoRA, for tests (nothing is downloaded)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import peft
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

from flaplace.params import model_inputs

VOCAB = 48
ANSWERS = (3, 5, 7)

#: LoRA targets (the attention projections) of each tiny architecture.
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}


def tiny_base_model(
    arch: str, *, hidden: int = 16, vocab: int = VOCAB, num_labels: int = 3, **config: object
) -> torch.nn.Module:
    """A tiny random Hugging Face model: 2 layers, 2 heads, intermediate size ``2 * hidden``.

    ``llama``, ``mistral`` (one key/value head), ``phi`` and ``gpt2`` are causal LMs; ``bert`` is a
    sequence classifier with ``num_labels`` classes and no dropout. ``config`` overrides or adds
    configuration fields (e.g. ``attn_implementation="eager"``, ``initializer_range=0.2``).
    The weights depend on torch's global seed: seed before calling.
    """
    common = {"num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": vocab}
    sized = {"hidden_size": hidden, "intermediate_size": 2 * hidden, **common}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**sized, num_key_value_heads=2, **config))
    if arch == "mistral":
        return MistralForCausalLM(
            MistralConfig(**sized, num_key_value_heads=1, sliding_window=None, **config)
        )
    if arch == "phi":
        return PhiForCausalLM(PhiConfig(**sized, **config))
    if arch == "gpt2":
        settings = {"bos_token_id": 0, "eos_token_id": 0, **config}
        return GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=2, n_head=2, vocab_size=vocab, **settings))
    if arch == "bert":
        settings = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **config}
        return BertForSequenceClassification(BertConfig(**sized, num_labels=num_labels, **settings))
    raise ValueError(f"unknown tiny architecture {arch!r}")


ARCHITECTURES = tuple(LORA_TARGETS)


def tiny_lora_model(
    arch: str,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    rank: int = 2,
    targets: list[str] | None = None,
):
    """A tiny random model of ``arch`` with LoRA adapters whose weights are random (not PEFT's zero B).

    ``targets`` overrides the adapted modules (default: the attention projections, :data:`LORA_TARGETS`).
    """
    torch.manual_seed(seed)
    targets = LORA_TARGETS[arch] if targets is None else targets
    model = tiny_base_model(arch)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    model = peft.get_peft_model(model, config)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def padded_batch(arch: str, n: int = 3, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with padding: left padding for causal LMs, right padding for BERT; labels included."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for row in range(1, n):
        pad = min(row, length - 1)
        if arch == "bert":
            mask[row, length - pad :] = 0
        else:
            mask[row, :pad] = 0
    ids = ids * mask
    labels = torch.randint(0, len(ANSWERS), (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@contextlib.contextmanager
def float64_rms_norm():
    """Run Llama/Mistral RMSNorm in the input dtype.

    Hugging Face computes RMSNorm in float32 even for float64 inputs; that
    rounding makes back-propagation non-linear at the 1e-7 level, which would
    hide a 1e-10 comparison. The maths is unchanged.
    """
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral

    classes = [modeling_llama.LlamaRMSNorm, modeling_mistral.MistralRMSNorm]
    saved = [c.forward for c in classes]
    for c in classes:
        c.forward = _rms_norm_in_input_dtype
    try:
        yield
    finally:
        for c, f in zip(classes, saved, strict=True):
            c.forward = f


# --------------------------------------------------------------------------------------------
# Benchmark-sized models and data, shared with benchmarks/ (which put this folder on sys.path)
# --------------------------------------------------------------------------------------------


def peer_llama_lora(
    hidden: int,
    *,
    layers: int = 2,
    vocab: int = 512,
    rank: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A random Llama-architecture causal LM with PEFT LoRA on q_proj and v_proj.

    LoRA ``B`` starts random (not PEFT's zeros) so that every factor is informative.
    """
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // 64, 2),
        "num_key_value_heads": max(hidden // 64, 2),
        "vocab_size": vocab,
        "max_position_embeddings": 256,
    }
    base = LlamaForCausalLM(LlamaConfig(**config))
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(base, lora).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    return model, {**config, "lora_rank": rank, "lora_alpha": 2 * rank, "lora_targets": ["q_proj", "v_proj"]}


class LogitsModule(nn.Module):
    """``forward(batch) -> (B, C)`` logits: the interface laplace-torch's backends need.

    Drops the batch's ``labels`` before calling the Hugging Face model and applies an output
    function (e.g. `flaplace.params.LastTokenLogits`).
    """

    def __init__(self, model: nn.Module, output_fn: Callable[[Any, Any], Tensor]):
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        _, inputs = model_inputs(batch)
        return self.output_fn(self.model(**inputs), inputs)


class ListDataset(torch.utils.data.Dataset):
    """A list of per-example dicts (so that ``len(loader.dataset)`` is the data size)."""

    def __init__(self, rows: list[dict[str, Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.rows[index]


def token_data(n: int, length: int, vocab: int, n_classes: int, seed: int) -> ListDataset:
    """Random token sequences without padding; the label is a function of the last token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=generator)
    labels = ids[:, -1] % n_classes
    mask = torch.ones(length, dtype=torch.long)
    return ListDataset([{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)])


def llama_lora_model(
    hidden: int,
    *,
    layers: int = 2,
    vocab: int = 1024,
    rank: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """A randomly initialised Llama (``layers`` blocks) with PEFT LoRA of rank ``rank`` on q/v.

    The intermediate size is ``2.6875 * hidden`` (Llama-7B's ratio), one head per 64 features.
    PEFT initialises ``lora_B`` to zero, which would make every ``lora_A`` gradient zero; it is
    drawn from ``N(0, 0.02^2)`` instead, as after some training.
    """
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()
