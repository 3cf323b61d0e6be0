"""Hugging Face ``datasets`` as inputs: a ``Dataset``, a ``DatasetDict`` (its splits) or a ``save_to_disk`` folder.

``datasets`` is optional (the ``hf`` extra): it is imported only to read a ``save_to_disk``
folder, and an object is recognised as a ``Dataset`` only when ``datasets`` is already imported
(an object of that library cannot exist otherwise).

* [`open_source`][flaplace.app.hfdatasets.open_source] turns what a user passes as data (a file
  path, a folder written by ``save_to_disk``, a ``Dataset`` or a ``DatasetDict``) into a path, a
  ``Dataset`` or a dict of splits, and names the cause when it cannot.
* [`dataset_splits`][flaplace.app.hfdatasets.dataset_splits] finds the ``train``, ``validation``
  and ``test`` splits of a ``DatasetDict`` under their usual names.
* [`dataset_batches`][flaplace.app.hfdatasets.dataset_batches] turns a tokenised ``Dataset`` into
  padded batches of tensors (a ``DataLoader``), for the Trainer helpers.

Examples:
    >>> import datasets  # doctest: +SKIP
    >>> splits = dataset_splits(datasets.load_dataset("imdb"))  # doctest: +SKIP
    >>> sorted(splits)  # doctest: +SKIP
    ['test', 'train']
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "SPLIT_NAMES",
    "DatasetLike",
    "PaddingCollator",
    "dataset_loaders",
    "dataset_batches",
    "dataset_splits",
    "is_dataset",
    "is_dataset_dict",
    "is_saved_dataset",
    "open_source",
]

#: A ``datasets.Dataset`` or ``DatasetDict`` (typed loosely: ``datasets`` is optional).
DatasetLike: TypeAlias = Any

#: The names a split goes by in ``DatasetDict``s, in order of preference.
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "eval", "evaluation", "validation_matched"),
    "test": ("test", "testing", "test_matched"),
}

#: The files ``save_to_disk`` writes: a ``Dataset`` folder, and a ``DatasetDict`` folder.
_DATASET_FILES = ("state.json", "dataset_info.json")
_DATASET_DICT_FILE = "dataset_dict.json"
#: Padding of the batch keys that hold sequences (``input_ids`` takes the model's pad id).
_PAD_VALUES = {"attention_mask": 0, "labels": -100, "token_type_ids": 0}
#: Batch keys a model takes (other columns, e.g. raw text, stay out of the batches).
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "label")


def _datasets_module() -> Any:
    return sys.modules.get("datasets")


def is_dataset(obj: object) -> bool:
    """Whether ``obj`` is a ``datasets.Dataset`` (without importing ``datasets``).

    Examples:
        >>> is_dataset([{"text": "a"}])
        False
    """
    module = _datasets_module()
    return module is not None and isinstance(obj, module.Dataset)


def is_dataset_dict(obj: object) -> bool:
    """Whether ``obj`` is a ``datasets.DatasetDict`` (without importing ``datasets``).

    Examples:
        >>> is_dataset_dict({"train": []})
        False
    """
    module = _datasets_module()
    return module is not None and isinstance(obj, module.DatasetDict)


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.

    Examples:
        >>> is_saved_dataset(".")
        False
    """
    folder = Path(path)
    return (folder / _DATASET_DICT_FILE).is_file() or all((folder / f).is_file() for f in _DATASET_FILES)


def _load_from_disk(folder: Path) -> Any:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise ImportError(
            f"{folder} is a folder written by `datasets`' save_to_disk; reading it needs the `datasets` "
            "library: pip install 'flaplace[hf]'"
        ) from None
    return datasets.load_from_disk(str(folder))


def open_source(source: object, what: str = "data") -> str | Any | dict[str, Any]:
    """What a user passes as data, opened: a file path (``str``), a ``Dataset``, or a dict of splits.

    Args:
        source: a ``.jsonl``/``.csv``/``.tsv`` file, a folder written by ``save_to_disk`` (of a
            ``Dataset`` or a ``DatasetDict``), a ``datasets.Dataset`` or a ``datasets.DatasetDict``.
        what: how errors name the data (e.g. ``"--data-path"``).

    Returns:
        The file's path as a string, the ``Dataset``, or ``{"train": ..., "validation": ...,
        "test": ...}`` (the splits present, see `dataset_splits`) for a ``DatasetDict``.

    Raises:
        FileNotFoundError: the path does not exist, or is a folder that ``save_to_disk`` did not
            write.
        TypeError: ``source`` is neither a path nor a ``datasets`` object.
        ImportError: a ``save_to_disk`` folder without ``datasets`` installed.
        ValueError: a ``DatasetDict`` without a training split.

    Examples:
        >>> open_source("reviews.jsonl")  # doctest: +SKIP
        'reviews.jsonl'
    """
    if is_dataset_dict(source):
        return dataset_splits(source)  # type: ignore[arg-type]
    if is_dataset(source):
        return source
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"{what} must be a .jsonl/.csv/.tsv file, a datasets save_to_disk folder, a datasets.Dataset "
            f"or a datasets.DatasetDict; got {type(source).__name__}"
        )
    path = Path(source)
    if path.is_file():
        return str(source)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not is_saved_dataset(path):
        raise FileNotFoundError(
            f"{what} {path} is a folder but not one written by datasets' save_to_disk (it has no "
            f"{_DATASET_DICT_FILE}, nor {' and '.join(_DATASET_FILES)}); give a .jsonl/.csv/.tsv file "
            "or the folder save_to_disk wrote"
        )
    return open_source(_load_from_disk(path), what)


def dataset_splits(splits: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train``, ``validation`` and ``test`` splits of a ``DatasetDict``, found by `SPLIT_NAMES`.

    Splits under other names (e.g. ``unsupervised``) are left out; ``validation`` and ``test``
    may be missing.

    Raises:
        ValueError: no training split, naming the splits found.

    Examples:
        >>> sorted(dataset_splits({"training": [1], "dev": [2]}))
        ['train', 'validation']
    """
    found: dict[str, Any] = {}
    lowered = {str(name).lower(): name for name in splits}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if name in lowered:
                found[split] = splits[lowered[name]]
                break
    if "train" not in found:
        raise ValueError(
            f"the DatasetDict has the splits {list(splits)} but no training split; name it one of "
            f"{', '.join(SPLIT_NAMES['train'])} (validation and test are optional)"
        )
    return found


def class_label_names(dataset: Any, column: str) -> tuple[str, ...] | None:
    """The class names of ``column`` when its feature is a ``ClassLabel``, else ``None``.

    Examples:
        >>> class_label_names(None, "label") is None
        True
    """
    feature = getattr(dataset, "features", {}).get(column) if dataset is not None else None
    names = getattr(feature, "names", None)
    return tuple(str(n) for n in names) if names else None


def _pad(values: Sequence[Any], pad: int) -> Tensor:
    tensors = [torch.as_tensor(v) for v in values]
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    if any(t.ndim != 1 for t in tensors):
        raise ValueError("cannot pad a column whose rows are not 1-D sequences")
    width = max(len(t) for t in tensors)
    out = torch.full((len(tensors), width), pad, dtype=tensors[0].dtype)
    for row, t in enumerate(tensors):
        out[row, : len(t)] = t
    return out


class PaddingCollator:
    """Right-pad the sequences of a list of rows into a batch: ``input_ids`` with ``pad_token_id``,
    ``attention_mask`` with 0, token ``labels`` with -100; a ``label`` column becomes ``labels``.

    Examples:
        >>> batch = PaddingCollator(0)([{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}])
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[5, 6], [7, 0]], [[1, 1], [1, 0]], [1, 0])
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for key in _MODEL_KEYS:
            if key not in rows[0]:
                continue
            name = "labels" if key == "label" else key
            batch[name] = _pad([row[key] for row in rows], _PAD_VALUES.get(name, self.pad_token_id))
        if "attention_mask" not in batch and "input_ids" in batch:
            lengths = torch.tensor([len(row["input_ids"]) for row in rows])
            width = batch["input_ids"].shape[1]
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return batch


def dataset_batches(
    dataset: Any, *, batch_size: int = 8, pad_token_id: int = 0, keys: Sequence[str] = _MODEL_KEYS
) -> torch.utils.data.DataLoader:
    """A tokenised ``Dataset`` as a ``DataLoader`` of padded batches (in order, not shuffled).

    Args:
        dataset: a ``datasets.Dataset`` with an ``input_ids`` column (as a tokenizer's ``map``
            gives) and a ``labels`` or ``label`` column; ``attention_mask`` and
            ``token_type_ids`` are used when present, other columns (the raw text) left out.
        batch_size: examples per batch.
        pad_token_id: the padding of ``input_ids`` (masked out by the attention mask).
        keys: the columns that go into the batches, when present.

    Raises:
        ValueError: no ``input_ids`` column (the dataset is not tokenised).

    Examples:
        >>> loader = dataset_batches(tokenised["train"], batch_size=16)  # doctest: +SKIP
    """
    columns = list(getattr(dataset, "column_names", []))
    if "input_ids" not in columns:
        raise ValueError(
            f"the Dataset has the columns {columns} but no input_ids: tokenise it first "
            "(dataset.map(lambda row: tokenizer(row['text']), batched=True))"
        )
    keep = [c for c in columns if c in keys]
    return torch.utils.data.DataLoader(
        dataset.select_columns(keep), batch_size=batch_size, collate_fn=PaddingCollator(pad_token_id)
    )


def as_batches(
    data: Any, *, batch_size: int = 8, pad_token_id: int = 0, keys: Sequence[str] = _MODEL_KEYS
) -> Any:
    """``data`` unchanged, or a ``Dataset`` (a ``DatasetDict``'s training split) as `dataset_batches`.

    Examples:
        >>> as_batches([1, 2])
        [1, 2]
    """
    if is_dataset_dict(data):
        data = dataset_splits(data)["train"]
    if is_dataset(data):
        return dataset_batches(data, batch_size=batch_size, pad_token_id=pad_token_id, keys=keys)
    return data


def dataset_loaders(train: Any, val: Any, model: object, *, batch_size: int = 8) -> tuple[Any, Any]:
    """The Trainer helpers' training and validation data, with ``Dataset`` s turned into batches.

    A ``DatasetDict`` gives its training split, and its validation split when ``val`` is
    ``None``; a tokenised ``Dataset`` becomes `dataset_batches` padded with the model's
    ``config.pad_token_id`` (0 when it has none). Anything else (a ``DataLoader``, a list of
    batches) is returned unchanged.

    Examples:
        >>> dataset_loaders([{"input_ids": 1}], None, model=None)
        ([{'input_ids': 1}], None)
    """
    if is_dataset_dict(train):
        splits = dataset_splits(train)
        train = splits["train"]
        val = splits.get("validation") if val is None else val
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    pad_token_id = pad if isinstance(pad, int) else 0
    # token_type_ids only for models that name them (BERT does, Llama does not)
    keys = tuple(k for k in _MODEL_KEYS if k != "token_type_ids" or "token_type_ids" in _forward_names(model))
    return (
        as_batches(train, batch_size=batch_size, pad_token_id=pad_token_id, keys=keys),
        as_batches(val, batch_size=batch_size, pad_token_id=pad_token_id, keys=keys),
    )


def _forward_names(model: object) -> frozenset[str]:
    """The parameter names of ``model.forward`` (of the base model for a PEFT wrapper)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    try:
        return frozenset(inspect.signature(base.forward).parameters)  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return frozenset()
