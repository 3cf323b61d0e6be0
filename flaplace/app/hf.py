"""Hugging Face models for the workflow: loading and tokenisation into batches (LoRA: `flaplace.app.lora`).

Two kinds of model are supported:

* ``causal``: a causal language model scores the task's answers as the logits of
  their (single) tokens at the last position of the prompt. Prompts are padded on
  the LEFT (and truncated from the left, so the end of the prompt, ``Answer:``,
  survives), and [`flaplace.params.LastTokenLogits`][flaplace.params.LastTokenLogits] reads the answer-token
  logits. Each answer, with a leading space, must be one token of the vocabulary.
* ``seq_cls``: a sequence-classification model (e.g. BERT) gets the raw text (and
  ``text_pair``) and its classification head gives ``(batch, classes)`` logits.
  The head is new for a checkpoint that has none, so it is trained with the
  adapters and covered by the Laplace posterior.

Examples:
    >>> loaded = load_model("path/to/model", n_classes=2)
    >>> model = lora.attach_lora(loaded, rank=8, alpha=16, targets=["query", "value"])
    >>> ids = answer_token_ids(loaded.tokenizer, ("A", "B"))  # causal models only
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor, nn

from flaplace.app.models import resolve_model
from flaplace.app.tasks import Example, Task, batches
from flaplace.params import LastTokenLogits, ModelFunction, classifier_logits

ModelKind: TypeAlias = Literal["causal", "seq_cls"]
MODEL_KINDS: tuple[str, ...] = ("auto", "causal", "seq_cls")

#: Attribute names under which Hugging Face sequence-classification models keep their head.
HEAD_NAMES: tuple[str, ...] = ("classifier", "score")

#: Prompt suffix for a classification task (raw text) scored by a causal LM.
CAUSAL_CLASSIFICATION_SUFFIX = "Answer:"


@dataclass
class LoadedModel:
    """A model, its tokenizer and how it turns examples into logits.

    ``kind`` is ``"causal"`` or ``"seq_cls"``; ``head`` the attribute name of the
    classification head (``seq_cls`` only, else ``None``).
    """

    model: nn.Module
    tokenizer: Any
    kind: ModelKind
    head: str | None = None


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the hf extra is missing
        raise ImportError(
            "loading Hugging Face models needs `transformers` and `peft`: pip install 'flaplace[hf]'"
        ) from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (e.g. 'newly initialized classifier'): we log our own."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def infer_kind(config: Any) -> ModelKind:
    """``causal`` when the config's architectures name a causal LM head, else ``seq_cls``.

    Examples:
        >>> infer_kind(AutoConfig.from_pretrained("gpt2"))
        'causal'
    """
    architectures = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHeadModel" in a for a in architectures):
        return "causal"
    return "seq_cls"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"``/``"bfloat16"``/``"float16"`` as a torch dtype.

    Examples:
        >>> parse_dtype("float64")
        torch.float64
    """
    if isinstance(name, torch.dtype):
        return name
    dtypes = {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


def check_model_source(source: str) -> None:
    """Raise ``FileNotFoundError`` when ``source`` names a local folder that does not exist.

    A hub id has at most one ``/`` and does not start with ``.``, ``/`` or ``~``; anything
    else, and any existing path, is a local folder.

    Examples:
        >>> check_model_source("gpt2")
        >>> check_model_source("./no/such/model")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model folder not found: ./no/such/model
    """
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model folder not found: {source}")


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    n_classes: int,
    kind: str = "auto",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer by hub id or local folder.

    Args:
        name_or_path: a Hugging Face hub id, a folder written by ``save_pretrained``, a
            ``.gguf`` file, a folder holding one GGUF file, or a packaged short name
            (``"smollm2"``); see [`resolve_model`][flaplace.app.models.resolve_model]. GGUF
            checkpoints load offline as causal LMs (their weights de-quantised to ``dtype``).
        n_classes: classes of the task (the size of a sequence-classification head).
        kind: ``"auto"`` (from the config's architectures), ``"causal"`` or ``"seq_cls"``.
        dtype: parameter dtype.
        device: where the model lives.
        attn_implementation: passed to ``from_pretrained`` when given (e.g. ``"eager"``).

    Returns:
        A `LoadedModel` in eval mode. For causal models the tokenizer pads and
        truncates on the left and has a pad token (its EOS token when it had none).

    Raises:
        ValueError: an unknown ``kind``, ``seq_cls`` for a GGUF checkpoint, or a packaged
            short name whose package is missing; OSError from transformers when the model is
            not found.

    Examples:
        >>> loaded = load_model("sentence-transformers/all-MiniLM-L6-v2", n_classes=2)
        >>> loaded.kind, loaded.head
        ('seq_cls', 'classifier')
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")
    transformers = _transformers()
    source, gguf = resolve_model(name_or_path)
    check_model_source(source)
    extra: dict[str, Any] = {} if gguf is None else {"gguf_file": gguf}
    if gguf is not None and kind == "seq_cls":
        raise ValueError(f"model {name_or_path!s} is a GGUF causal LM: use --model-kind auto or causal")
    config = transformers.AutoConfig.from_pretrained(source, **extra)
    # a GGUF file's config has no architectures; GGUF checkpoints here are causal LMs
    auto: ModelKind = "causal" if gguf is not None else infer_kind(config)
    resolved: ModelKind = auto if kind == "auto" else kind  # type: ignore[assignment]
    options: dict[str, Any] = {"dtype": parse_dtype(dtype), **extra}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
    with _quiet_transformers():
        if resolved == "causal":
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **options)
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=n_classes, ignore_mismatched_sizes=True, **options
            )
    head = None
    if resolved == "causal":
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {source} has neither a pad nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        head = next((h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)), None)
        if head is None:
            raise ValueError(
                f"cannot find the classification head of {type(model).__name__} (looked for {HEAD_NAMES})"
            )
        if tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer of {source} has no pad token")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model.to(device).eval(), tokenizer, resolved, head)


def answer_token_ids(tokenizer: Any, choices: Sequence[str]) -> list[int]:
    """The single token id of each answer, written with a leading space (``" A"``).

    Raises:
        ValueError: an answer that is not exactly one token, naming it and its tokens,
            or two answers with the same token.

    Examples:
        >>> answer_token_ids(gpt2_tokenizer, ("A", "B", "C", "D"))
        [317, 347, 327, 360]
    """
    ids = []
    for choice in choices:
        tokens = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise ValueError(
                f"answer {choice!r} (with a leading space, {' ' + choice!r}) is {len(tokens)} tokens "
                f"{pieces} for this tokenizer; causal-LM answers must be single tokens"
            )
        if tokenizer.unk_token_id is not None and tokens[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"answer {choice!r} is not in the vocabulary (it tokenises to the unknown token)"
            )
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {tuple(choices)} do not map to distinct tokens: {ids}")
    return ids


def causal_prompt(example: Example, task: Task) -> str:
    """The prompt a causal LM sees: the task's prompt, or raw text plus ``Answer:`` for classification.

    Examples:
        >>> causal_prompt(Example("a fine film", ("negative", "positive"), 1), sst2_task)
        'a fine film Answer:'
    """
    if task.kind != "classification":
        return example.text
    text = example.text if example.text_pair is None else f"{example.text} {example.text_pair}"
    return f"{text} {CAUSAL_CLASSIFICATION_SUFFIX}"


def output_function(loaded: LoadedModel, task: Task):
    """The output function of the model function: answer-token logits or the classifier's logits.

    Examples:
        >>> f = ModelFunction(peft_model, params, output_function(loaded, task))
    """
    if loaded.kind == "causal":
        return LastTokenLogits(answer_token_ids(loaded.tokenizer, task.answer_words))
    return classifier_logits


def model_function(model: nn.Module, names: Sequence[str], loaded: LoadedModel, task: Task) -> ModelFunction:
    """``f(params, batch) -> logits (batch, n_classes)`` for ``model`` with weights ``names`` swapped in.

    Examples:
        >>> f = model_function(peft_model, lora.laplace_param_names(peft_model), loaded, task)
    """
    return ModelFunction(model, list(names), output_function(loaded, task))


def encode(
    examples: Sequence[Example],
    loaded: LoadedModel,
    task: Task,
    *,
    max_length: int,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Tokenise examples into a padded batch with ``labels``.

    Causal models get `causal_prompt` padded on the left; sequence-classification
    models get ``text`` (and ``text_pair``) padded on the right. Sequences longer than
    ``max_length`` are truncated (from the left for causal models).

    Examples:
        >>> batch = encode(task.split("train")[:8], loaded, task, max_length=128)
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'labels', 'token_type_ids']
    """
    if not examples:
        raise ValueError("encode() got no examples")
    tok = loaded.tokenizer
    common = {"padding": True, "truncation": True, "max_length": max_length, "return_tensors": "pt"}
    if loaded.kind == "causal":
        encoded = tok([causal_prompt(ex, task) for ex in examples], **common)
    else:
        texts = [ex.text for ex in examples]
        pairs = [ex.text_pair for ex in examples]
        if any(p is not None for p in pairs):
            if any(p is None for p in pairs):
                raise ValueError("a batch mixes examples with and without text_pair")
            encoded = tok(texts, pairs, **common)
        else:
            encoded = tok(texts, **common)
    batch = {
        k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    labels = [ex.label for ex in examples]
    bad = [y for y in labels if not 0 <= y < task.n_classes]
    if bad:
        raise ValueError(
            f"label {bad[0]} is outside the classes 0..{task.n_classes - 1} of task {task.name!r}"
        )
    batch["labels"] = torch.tensor(labels, dtype=torch.long, device=device)
    return batch


def encode_batches(
    examples: Sequence[Example],
    loaded: LoadedModel,
    task: Task,
    *,
    batch_size: int,
    max_length: int,
    device: str | torch.device = "cpu",
) -> list[dict[str, Tensor]]:
    """Tokenise ``examples`` into padded batches of at most ``batch_size``, in order.

    Examples:
        >>> encoded = encode_batches(task.split("test"), loaded, task, batch_size=32, max_length=128)  # doctest: +SKIP
    """
    return [
        encode(chunk, loaded, task, max_length=max_length, device=device)
        for chunk in batches(examples, batch_size)
    ]
