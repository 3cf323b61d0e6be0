"""A user's own classification or multiple-choice data from a JSONL or CSV file, or a ``datasets.Dataset``, by named columns.

Two kinds of data:

* classification: a ``text`` column (and optionally a ``text_pair`` column) and a ``label`` column
  holding a class name or index. The classes are given, or found: the sorted distinct labels
  (names, or the integers ``0..K-1``).
* multiple choice: a ``text`` column (the question), the choices (one column holding a list, in
  JSONL, or several columns, one per option, e.g. ``A,B,C,D`` in a CSV) and a ``label`` column
  holding the index of the right choice, its letter (``"A"``) or its text.

Every row becomes a `UserExample` with the fields of the task examples the pipeline uses
(``text``, ``choices``, ``label`` as a class index, ``text_pair``). Errors say where (file and
line, or dataset row), which column is missing and which columns the file has.

A Hugging Face ``datasets.Dataset`` (or a folder written by its ``save_to_disk``) is read the same
way, one row per example; a label column whose feature is a ``ClassLabel`` gives the class names.

Examples:
    >>> data = load_user_data("reviews.csv", text="review", label="sentiment")
    >>> data.kind, data.classes, data.examples[0]
    ('classification', ('negative', 'positive'), UserExample(text='a fine film', choices=('negative', 'positive'), label=1, text_pair=None))
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from flaplace.app.hfdatasets import class_label_names, open_source

__all__ = ["UserData", "UserDataError", "UserExample", "dataset_rows", "load_user_data", "read_rows"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class UserDataError(ValueError):
    """A user's data file cannot be read as the columns say."""


class UserExample(NamedTuple):
    """One example: the text (or question), the answer strings, the label's index, a second text."""

    text: str
    choices: tuple[str, ...]
    label: int
    text_pair: str | None = None


class UserData(NamedTuple):
    """The examples of a file, their kind (``"classification"`` or ``"multiple_choice"``) and classes.

    ``classes`` are the class names of a classification file, or the option letters
    (``"A"``, ``"B"``, ...) of a multiple-choice file.
    """

    kind: str
    classes: tuple[str, ...]
    examples: list[UserExample]


def read_rows(path: str | os.PathLike[str]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Read ``.jsonl`` (one JSON object a line), ``.csv`` or ``.tsv`` (with a header row).

    Returns:
        ``(rows, columns)``: ``(location, record)`` per row, ``location`` being ``file:line``,
        and the column names in the order first seen.

    Raises:
        UserDataError: a missing file, an unknown suffix, invalid JSON, a line that is not an
            object, or an empty file.

    Examples:
        >>> rows, columns = read_rows("my.jsonl")
    """
    file = Path(path)
    if not file.is_file():
        raise UserDataError(f"data file {file} does not exist")
    suffix = file.suffix.lower()
    rows: list[tuple[str, dict[str, Any]]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserDataError(
                        f"{where}: invalid JSON ({err.msg}); the file must hold one object a line"
                    ) from None
                if not isinstance(record, dict):
                    raise UserDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                rows.append((where, record))
    elif suffix in (".csv", ".tsv"):
        with file.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for lineno, record in enumerate(reader, start=2):
                rows.append((f"{file}:{lineno}", dict(record)))
    else:
        raise UserDataError(f"data file {file}: unknown format {suffix!r}; use .jsonl, .csv or .tsv")
    if not rows:
        raise UserDataError(f"data file {file} has no rows")
    columns: list[str] = []
    for _, record in rows:
        columns.extend(k for k in record if k not in columns)
    return rows, columns


def _field(record: Mapping[str, Any], column: str, option: str, where: str, columns: Sequence[str]) -> Any:
    if column not in record or record[column] is None:
        raise UserDataError(
            f"{where}: no column {column!r} (the {option} column); the columns found are: {', '.join(columns)}"
        )
    return record[column]


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise UserDataError(f"{where}: column {column!r} must hold text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise UserDataError(f"{where}: column {column!r} is empty")
    return text


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def dataset_rows(
    dataset: Any, name: str = "the dataset"
) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The rows of a ``datasets.Dataset`` as `read_rows` gives a file's: ``(location, record)`` and the columns.

    Raises:
        UserDataError: the dataset has no rows.

    Examples:
        >>> rows, columns = dataset_rows(datasets.Dataset.from_dict({"text": ["a"], "label": [0]}))  # doctest: +SKIP
        >>> rows[0], columns  # doctest: +SKIP
        (('the dataset, row 0', {'text': 'a', 'label': 0}), ['text', 'label'])
    """
    records = dataset.to_list()
    if not records:
        raise UserDataError(f"{name} has no rows")
    return [(f"{name}, row {i}", dict(r)) for i, r in enumerate(records)], list(dataset.column_names)


def load_user_data(
    path: str | os.PathLike[str] | Any,
    *,
    text: str = "text",
    label: str = "label",
    text_pair: str | None = None,
    choices: str | Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    name: str | None = None,
) -> UserData:
    """Read a user's JSONL/CSV file or ``datasets.Dataset`` into examples, by column names.

    Args:
        path: a ``.jsonl``, ``.csv`` or ``.tsv`` file, a ``datasets.Dataset``, or a folder
            written by ``Dataset.save_to_disk``.
        text: the column of the text (classification) or the question (multiple choice).
        label: the column of the label.
        text_pair: the column of a second text (pair classification, e.g. entailment), or ``None``.
        choices: multiple choice only: one column holding a list of options (JSONL), or several
            columns, one per option (e.g. ``["A", "B", "C", "D"]``); a comma-separated string
            names several columns too. ``None`` reads a classification file.
        classes: classification only: the class names in index order. Labels may then be names
            or indices. Default: the sorted distinct labels (indices ``0..K-1`` when all labels
            are integers, names otherwise; for a ``Dataset`` whose label feature is a
            ``ClassLabel``, its names).
        name: how errors name a ``Dataset`` (default ``"the dataset"``; a file is named by its path).

    Returns:
        A `UserData`.

    Raises:
        UserDataError: a missing column (naming it, its option and the columns found), an
            empty text, a label outside the classes or the options, rows with different
            numbers of options, fewer than two classes, a ``DatasetDict`` (one split is read here).
        FileNotFoundError, TypeError, ImportError: a folder that ``save_to_disk`` did not write,
            an object that is neither a path nor a ``Dataset``, a ``save_to_disk`` folder without
            ``datasets`` installed.

    Examples:
        >>> mc = load_user_data("quiz.csv", text="question", label="answer", choices="A,B,C,D")
        >>> mc.kind, mc.classes
        ('multiple_choice', ('A', 'B', 'C', 'D'))
    """
    if isinstance(path, str | os.PathLike) and not Path(path).is_dir():
        rows, columns = read_rows(path)
    else:
        source = open_source(path, "data")
        is_path = isinstance(path, str | os.PathLike)
        if isinstance(source, dict):
            raise UserDataError(
                f"{path if is_path else 'the data'} is a DatasetDict with the splits {list(source)}; "
                "load_user_data reads one split: pass one of them (e.g. data['train']), or use "
                "load_task('user', ...), which reads them all"
            )
        rows, columns = dataset_rows(source, name or (str(path) if is_path else "the dataset"))
        if classes is None and choices is None:
            classes = class_label_names(source, label)
    if choices is not None:
        return _multiple_choice(rows, columns, text, label, choices)
    return _classification(rows, columns, text, label, text_pair, classes)


def _classification(
    rows: list[tuple[str, dict[str, Any]]],
    columns: list[str],
    text: str,
    label: str,
    text_pair: str | None,
    classes: Sequence[str] | None,
) -> UserData:
    raw = []
    for where, record in rows:
        body = _text(_field(record, text, "text", where, columns), text, where)
        pair = None
        if text_pair is not None:
            pair = _text(_field(record, text_pair, "text_pair", where, columns), text_pair, where)
        value = _field(record, label, "label", where, columns)
        if isinstance(value, str):
            value = value.strip()
        raw.append((where, body, pair, value))
    if classes is None:
        values = [v for _, _, _, v in raw]
        ints = [_as_int(v) for v in values]
        if all(i is not None for i in ints):
            top = max(i for i in ints if i is not None)
            names = tuple(str(k) for k in range(top + 1))
        else:
            names = tuple(sorted({str(v) for v in values}))
    else:
        names = tuple(str(c) for c in classes)
    if len(names) < 2:
        raise UserDataError(
            f"the labels give {len(names)} class(es) {list(names)}; a classifier needs at least two"
        )
    examples = []
    for where, body, pair, value in raw:
        if str(value) in names:
            index = names.index(str(value))
        else:
            number = _as_int(value)
            if number is None or not 0 <= number < len(names):
                raise UserDataError(f"{where}: label {value!r} is not one of the classes {list(names)}")
            index = number
        examples.append(UserExample(body, names, index, pair))
    return UserData("classification", names, examples)


def _multiple_choice(
    rows: list[tuple[str, dict[str, Any]]],
    columns: list[str],
    text: str,
    label: str,
    choices: str | Sequence[str],
) -> UserData:
    names = [c.strip() for c in choices.split(",")] if isinstance(choices, str) else list(choices)
    examples = []
    n_options = None
    for where, record in rows:
        question = _text(_field(record, text, "text", where, columns), text, where)
        if len(names) == 1:
            options = _field(record, names[0], "choices", where, columns)
            if isinstance(options, str):  # a CSV cell holding a JSON list
                try:
                    options = json.loads(options)
                except json.JSONDecodeError:
                    options = None
            if not isinstance(options, list):
                raise UserDataError(
                    f"{where}: the choices column {names[0]!r} must hold a list of options; "
                    "name one column per option instead (e.g. --choices A,B,C,D)"
                )
            option_texts = [_text(o, names[0], where) for o in options]
        else:
            option_texts = [_text(_field(record, n, "choices", where, columns), n, where) for n in names]
        if n_options is None:
            n_options = len(option_texts)
        if len(option_texts) != n_options or n_options < 2:
            raise UserDataError(
                f"{where}: {len(option_texts)} options, but the first row has {n_options}; every row "
                "needs the same number of options (at least two)"
            )
        value = _field(record, label, "label", where, columns)
        letters = LETTERS[: len(option_texts)]
        number = _as_int(value)
        if isinstance(value, str) and value.strip().upper() in letters and len(value.strip()) == 1:
            index = letters.index(value.strip().upper())
        elif number is not None and 0 <= number < len(option_texts):
            index = number
        elif isinstance(value, str) and value.strip() in option_texts:
            index = option_texts.index(value.strip())
        else:
            raise UserDataError(
                f"{where}: label {value!r} is neither an option's index (0..{len(option_texts) - 1}), "
                f"its letter ({', '.join(letters)}) nor its text"
            )
        examples.append(UserExample(question, tuple(option_texts), index))
    assert n_options is not None
    return UserData("multiple_choice", tuple(LETTERS[:n_options]), examples)
