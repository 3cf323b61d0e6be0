"""The ``user`` task: a user's own JSONL/CSV/TSV files or Hugging Face datasets, read by named columns, as a `Task`.

The files are read by [`load_user_data`][flaplace.app.userdata.load_user_data]. The splits:

* ``path`` (``--data-path``) is the training file, a ``datasets.Dataset``, or a
  ``datasets.DatasetDict`` whose ``train``/``validation``/``test`` splits are used as they are
  (also under the names ``training``, ``valid``, ``val``, ``dev``, ``eval``, ``testing``); a
  folder written by ``save_to_disk`` of either works the same.
* ``validation_path`` and ``test_path`` (``--validation-path``, ``--test-path``) are optional
  files with the same columns. A split without its own file is carved from the training file:
  the rows are shuffled with a generator seeded by ``seed`` (the run's ``--seed``) and
  `CARVE_FRACTION` of them (at least one row) go to each missing split, kept in file order;
  the rest stay for training. The same seed and file always give the same splits.

A classification file becomes a ``classification`` task whose answers are the class names (a
sequence-classification model gets the raw text and text pair; a causal LM reads
``"<text> Answer:"`` and scores the class names as answer tokens). A multiple-choice file
becomes a ``multiple_choice`` task: the prompt lists the options after letters and the answers
are the letters (``"A"``, ``"B"``, ...), as for the built-in multiple-choice tasks.

Examples:
    >>> task = load_user_task("reviews.jsonl", UserSpec(text="review", label="sentiment"))  # doctest: +SKIP
    >>> task.name, task.kind, task.choices  # doctest: +SKIP
    ('user', 'classification', ('negative', 'positive'))
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from flaplace.app.hfdatasets import is_dataset, open_source
from flaplace.app.tasks.examples import SPLITS, Example, Splits, TaskDataError
from flaplace.app.tasks.prompts import LETTERS, multiple_choice_prompt
from flaplace.app.userdata import UserData, load_user_data

__all__ = ["CARVE_FRACTION", "USER_TASK", "UserSpec", "carve_splits", "read_user_splits"]

#: The task name of a user's own data.
USER_TASK = "user"
#: The share of the training file carved for each split that has no file of its own.
CARVE_FRACTION = 0.1


class UserSpec(NamedTuple):
    """How to read a user's files: the column names and the optional validation and test files.

    Attributes:
        text: the column of the text (classification) or of the question (multiple choice).
        label: the column of the label (a class name or index; for multiple choice an
            option's index, letter or text).
        text_pair: the column of a second text (sentence pairs), or ``None``.
        choices: multiple choice only: one column holding a list of options, or one column
            per option (e.g. ``("A", "B", "C", "D")``); ``None`` for classification.
        classes: classification only: the class names in index order (default: the sorted
            distinct labels of the training file).
        validation_path: a file for the validation split (default: carved from the training file).
        test_path: a file for the test split (default: carved from the training file).

    Examples:
        >>> UserSpec(text="review").label
        'label'
    """

    text: str = "text"
    label: str = "label"
    text_pair: str | None = None
    choices: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    validation_path: str | None = None
    test_path: str | None = None


def _examples(data: UserData) -> list[Example]:
    if data.kind == "multiple_choice":
        if len(data.classes) > len(LETTERS):
            raise TaskDataError(
                f"multiple choice with {len(data.classes)} options; at most {len(LETTERS)} are supported"
            )
        return [
            Example(multiple_choice_prompt(ex.text, ex.choices), data.classes, ex.label)
            for ex in data.examples
        ]
    return [Example(ex.text, data.classes, ex.label, ex.text_pair) for ex in data.examples]


def carve_splits(examples: Sequence[Example], missing: Sequence[str], seed: int) -> Splits:
    """Divide ``examples`` into ``train`` and the ``missing`` splits, deterministically by ``seed``.

    Each missing split gets `CARVE_FRACTION` of the examples (rounded, at least one), drawn
    by a seeded shuffle; every split keeps the file order.

    Raises:
        TaskDataError: too few examples to leave at least one for training.

    Examples:
        >>> rows = [Example(str(i), ("a", "b"), i % 2) for i in range(20)]
        >>> splits = carve_splits(rows, ["validation", "test"], seed=0)
        >>> [len(splits[s]) for s in ("train", "validation", "test")]
        [16, 2, 2]
    """
    size = max(1, round(CARVE_FRACTION * len(examples)))
    if len(examples) <= size * len(missing):
        raise TaskDataError(
            f"the data file has {len(examples)} rows: too few to carve {', '.join(missing)} from it "
            f"({size} row(s) each) and keep rows for training; give --validation-path/--test-path files "
            "or more rows"
        )
    order = list(range(len(examples)))
    random.Random(f"user-splits:{seed}").shuffle(order)
    splits: Splits = {}
    for k, split in enumerate(missing):
        splits[split] = [examples[i] for i in sorted(order[k * size : (k + 1) * size])]
    splits["train"] = [examples[i] for i in sorted(order[len(missing) * size :])]
    return splits


def read_user_splits(
    path: str | Path | Any, spec: UserSpec, seed: int
) -> tuple[str, tuple[str, ...], Splits]:
    """Read the user's data into ``(kind, choices, splits)`` with all three splits.

    ``path`` is a ``.jsonl``/``.csv``/``.tsv`` training file, a ``datasets.Dataset`` (the
    training data), a ``datasets.DatasetDict`` (its ``train`` split, and its ``validation`` and
    ``test`` splits when it has them, under the names of
    `flaplace.app.hfdatasets.SPLIT_NAMES`), or a folder written by ``save_to_disk``
    of either. ``spec.validation_path`` and ``spec.test_path`` take precedence over the splits.
    The validation and test data are read with the training data's classes, so their labels
    must be among them; multiple-choice data must have the same number of options in every split.

    Raises:
        UserDataError, TaskDataError (both ``ValueError``): a missing column (naming it and
            the columns found), a bad label, files that disagree, too few rows to carve, a
            ``DatasetDict`` without a training split.
        FileNotFoundError, TypeError, ImportError: see [`open_source`][flaplace.app.hfdatasets.open_source].

    Examples:
        >>> kind, choices, splits = read_user_splits("quiz.csv", UserSpec(choices=("A", "B", "C", "D")), 0)  # doctest: +SKIP
        >>> kind, choices  # doctest: +SKIP
        ('multiple_choice', ('A', 'B', 'C', 'D'))
    """
    source = open_source(path, "data path")
    parts: dict[str, Any] = source if isinstance(source, dict) else {"train": source}
    where = str(path) if isinstance(path, str | os.PathLike) else "the DatasetDict"

    def describe(split: str, item: Any) -> str:
        if isinstance(item, str | os.PathLike):
            return str(item)
        return f"{where}, split {split!r}" if isinstance(source, dict) else "the dataset"

    def read(split: str, item: Any, classes: Sequence[str] | None) -> UserData:
        return load_user_data(
            item, text=spec.text, label=spec.label, text_pair=spec.text_pair, choices=spec.choices,
            classes=classes, name=describe(split, item),
        )  # fmt: skip

    train = read("train", parts["train"], spec.classes)
    kind = train.kind
    given = {"validation": spec.validation_path, "test": spec.test_path}
    splits: Splits = {}
    for split in ("validation", "test"):
        item = given[split] if given[split] is not None else parts.get(split)
        if item is None:
            continue
        data = read(split, item, train.classes if kind == "classification" else None)
        if data.classes != train.classes:
            raise TaskDataError(
                f"{describe(split, item)}: {len(data.classes)} options per question, but the training "
                f"{'data' if is_dataset(parts['train']) else 'file'} {describe('train', parts['train'])} "
                f"has {len(train.classes)}; every split needs the same number"
            )
        splits[split] = _examples(data)
    missing = [split for split in SPLITS if split != "train" and split not in splits]
    splits.update(carve_splits(_examples(train), missing, seed))
    return kind, train.classes, splits
