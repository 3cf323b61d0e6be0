"""Tasks: read evaluation data sets from their standard files into typed examples.

A :class:`Task` holds ``train``/``validation``/``test`` lists of :class:`Example`.
Every example of a task shares the same answer strings (``Task.choices``), so a
model scores a fixed set of ``n_classes`` answers:

* ``multiple_choice`` (ARC-Easy, ARC-Challenge, OpenBookQA, WinoGrande): the
  prompt lists the options after letters and the answers are the letters
  (``"A"``, ``"B"``, ...). Items whose number of options differs from the
  task's usual count are left out (counted in ``Task.n_dropped``).
* ``binary`` (BoolQ): the prompt asks for True or False; answers
  ``("False", "True")``.
* ``classification`` (SST-2, RTE and the bundled ``demo``): raw input text (and
  ``text_pair`` for sentence pairs) for sequence-classification models; the
  answers are the label names.

Answers are written without a leading space; prepend one before tokenising
for a causal LM (``" A"``, ``" True"`` are single tokens in common vocabularies).
Tokenisation belongs to the workflow, not to this module.

Where a data set has no labelled test split, its official development split is
used as ``test`` and a validation split is carved from ``train``; where only
one labelled split exists (WinoGrande dev, BoolQ dev with passages) it is split
deterministically with ``seed``. See ``docs/tasks.md`` for the full scheme.
"""

from __future__ import annotations

import csv
import importlib
import importlib.resources
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeAlias

TaskKind: TypeAlias = Literal["multiple_choice", "binary", "classification"]

#: The split names every task provides.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Environment variable naming a folder with one sub-folder per task.
DATA_DIR_ENV = "FLAPLACE_DATA_DIR"

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Select one of the choices that answers the following question:"
TRUE_FALSE_INSTRUCTION = "Answer the question with only True or False:"


class TaskDataError(ValueError):
    """A data file is malformed or holds a label outside the task's classes."""


class Example(NamedTuple):
    """One labelled example.

    ``text`` is the full prompt (multiple choice, binary) or the raw input text
    (classification); ``text_pair`` the second sentence of a pair task (RTE),
    else ``None``. ``choices`` are the answer strings, ``label`` the index of the
    correct one.

    Example:
        >>> ex = Example("Is water wet? Answer:", ("False", "True"), 1)
        >>> ex.choices[ex.label]
        'True'
    """

    text: str
    choices: tuple[str, ...]
    label: int
    text_pair: str | None = None


@dataclass(frozen=True)
class Task:
    """A named task with its examples per split.

    ``choices`` are the answer strings shared by all examples and ``n_classes``
    their number; ``n_dropped`` counts, per split (``"all"`` when the items
    were dropped before a single file was divided into splits), the items left
    out because their number of options differed from ``n_classes``; ``source`` says where
    the data was read from.

    Example:
        >>> task = Task("toy", "classification", 2, {"train": [Example("good", ("neg", "pos"), 1)]},
        ...             choices=("neg", "pos"))
        >>> len(task.split("train"))
        1
    """

    name: str
    kind: TaskKind
    n_classes: int
    splits: dict[str, list[Example]]
    choices: tuple[str, ...] = ()
    n_dropped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("multiple_choice", "binary", "classification"):
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}")
        if self.n_classes < 2:
            raise ValueError(f"task {self.name!r}: n_classes must be at least 2, got {self.n_classes}")
        if self.choices and len(self.choices) != self.n_classes:
            raise ValueError(
                f"task {self.name!r}: {len(self.choices)} choices {self.choices} "
                f"but n_classes={self.n_classes}"
            )
        for split, examples in self.splits.items():
            for i, ex in enumerate(examples):
                if len(ex.choices) != self.n_classes:
                    raise ValueError(
                        f"task {self.name!r}, split {split!r}, example {i}: "
                        f"{len(ex.choices)} choices but n_classes={self.n_classes}"
                    )
                if not 0 <= ex.label < self.n_classes:
                    raise ValueError(
                        f"task {self.name!r}, split {split!r}, example {i}: label {ex.label} "
                        f"is outside the classes 0..{self.n_classes - 1}"
                    )

    def split(self, name: str) -> list[Example]:
        """Return the examples of split ``name``; ``KeyError`` lists the available splits.

        Example:
            >>> task = load_task("demo")
            >>> len(task.split("test"))
            200
        """
        if name not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


# --------------------------------------------------------------------------- prompts


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """The Laplace-LoRA multiple-choice prompt; the answers are the option letters.

    Example:
        >>> multiple_choice_prompt("2 + 2 = ?", ["3", "4"])
        'Select one of the choices that answers the following question: 2 + 2 = ? Choices: A. 3 B. 4 Answer:'
    """
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2..{len(LETTERS)} options, got {len(options)}")
    listed = " ".join(f"{letter}. {_clean(text)}" for letter, text in zip(LETTERS, options, strict=False))
    return f"{MC_INSTRUCTION} {_clean(question)} Choices: {listed} Answer:"


def true_false_prompt(question: str, passage: str | None = None) -> str:
    """The BoolQ-style prompt; the answers are ``"False"`` and ``"True"``.

    Example:
        >>> true_false_prompt("is the sky blue", "The sky is blue")
        'Answer the question with only True or False: is the sky blue? Context: The sky is blue. Answer:'
    """
    question = _clean(question)
    if not question.endswith("?"):
        question += "?"
    if passage is None:
        return f"{TRUE_FALSE_INSTRUCTION} {question} Answer:"
    passage = _clean(passage)
    if not passage.endswith((".", "!", "?")):
        passage += "."
    return f"{TRUE_FALSE_INSTRUCTION} {question} Context: {passage} Answer:"


def format_prompt(fields: Mapping[str, Any], kind: TaskKind) -> str:
    """Format the prompt of one item from its fields.

    ``multiple_choice`` needs ``question`` and ``options``; ``binary`` needs
    ``question`` and optionally ``passage``; ``classification`` returns
    ``text`` unchanged.

    Example:
        >>> format_prompt({"question": "is ice cold", "passage": None}, "binary")
        'Answer the question with only True or False: is ice cold? Answer:'
        >>> format_prompt({"text": "a fine film"}, "classification")
        'a fine film'
    """
    required = {
        "multiple_choice": ("question", "options"),
        "binary": ("question",),
        "classification": ("text",),
    }
    if kind not in required:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(required)}")
    missing = [key for key in required[kind] if key not in fields]
    if missing:
        raise KeyError(f"format_prompt({kind!r}) needs the fields {missing}; got {sorted(fields)}")
    if kind == "multiple_choice":
        return multiple_choice_prompt(fields["question"], fields["options"])
    if kind == "binary":
        return true_false_prompt(fields["question"], fields.get("passage"))
    return str(fields["text"])


def _clean(text: str) -> str:
    """Collapse runs of whitespace and strip."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- batching


def batches(
    examples: Sequence[Example], batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[list[Example]]:
    """Yield lists of at most ``batch_size`` examples (the last one may be shorter).

    Example:
        >>> [len(b) for b in batches(load_task("demo").split("test"), 64)]
        [64, 64, 64, 8]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not examples:
        raise ValueError("batches() got no examples")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


# --------------------------------------------------------------------------- file reading


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"data file not found: {path}. Pass the folder holding the task's files as `path` "
            f"(e.g. ../shared/data/<task>) or set {DATA_DIR_ENV}."
        )
    return path


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, record)`` per non-empty line; location is ``file:line``."""
    with _require(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{where}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _read_json_array(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, record)`` for a file holding one JSON array of objects."""
    try:
        data = json.loads(_require(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TaskDataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, record in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(record, dict):
            raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _read_tsv(path: Path, header: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(location, columns)`` per data row of a TSV file whose first line is ``header``."""
    with _require(path).open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        found = next(rows, None)
        if found is None or [c.strip() for c in found] != list(header):
            raise TaskDataError(f"{path}:1: expected the header {list(header)}, found {found}")
        for lineno, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise TaskDataError(
                    f"{path}:{lineno}: expected {len(header)} tab-separated columns {list(header)}, "
                    f"found {len(row)}"
                )
            yield f"{path}:{lineno}", row


def _get(record: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in record:
        raise TaskDataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise TaskDataError(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


def _label_index(value: Any, classes: Sequence[Any], where: str) -> int:
    if value not in classes:
        raise TaskDataError(f"{where}: label {value!r} is outside the classes {list(classes)}")
    return list(classes).index(value)


# --------------------------------------------------------------------------- per-task readers

Splits: TypeAlias = dict[str, list[Example]]
#: A multiple-choice item before formatting: (question, options, label).
_Item: TypeAlias = tuple[str, list[str], int]


def _mc_examples(
    items: Iterable[_Item], n_options: int, dropped: dict[str, int], split: str
) -> list[Example]:
    """Build multiple-choice examples, dropping items with another number of options."""
    letters = tuple(LETTERS[:n_options])
    out = []
    for question, options, label in items:
        if len(options) != n_options:
            dropped[split] = dropped.get(split, 0) + 1
            continue
        out.append(Example(multiple_choice_prompt(question, options), letters, label))
    return out


def _arc_raw(path: Path) -> Iterator[_Item]:
    for where, record in _read_jsonl(path):
        question = _get(record, "question", where, dict)
        stem = _get(question, "stem", where)
        choices = _get(question, "choices", where, list)
        try:
            texts = [str(c["text"]) for c in choices]
            keys = [str(c["label"]) for c in choices]
        except (KeyError, TypeError):
            raise TaskDataError(f"{where}: each choice needs 'text' and 'label'") from None
        # answerKey is a letter or, for some items, a digit: match it against the choice labels
        answer = str(_get(record, "answerKey", where, (str, int))).strip()
        yield stem, texts, _label_index(answer, keys, where)


_ARC_INSTRUCTION = re.compile(
    r"^Please choose the correct answer to the question: (?P<stem>.*?)\n\n(?P<options>Answer1: .*?)"
    r"\n\nAnswer format: ",
    re.DOTALL,
)


def _arc_instruction(path: Path) -> Iterator[_Item]:
    """The LLM-Adapters instruction format (ARC train.json): stem, 'AnswerK: ...' options, 'answerK'."""
    for where, record in _read_json_array(path):
        match = _ARC_INSTRUCTION.match(_get(record, "instruction", where))
        if match is None:
            raise TaskDataError(f"{where}: instruction does not match the ARC 'Answer1: ...' format")
        parts = re.split(r"(?:^| )Answer(\d+): ", match["options"])
        numbers, texts = parts[1::2], parts[2::2]
        if parts[0] or numbers != [str(k) for k in range(1, len(numbers) + 1)]:
            raise TaskDataError(f"{where}: cannot split the options {match['options']!r}")
        answers = [f"answer{k}" for k in range(1, len(texts) + 1)]
        yield match["stem"], texts, _label_index(_get(record, "answer", where).strip(), answers, where)


def _arc_local(prefix: str) -> Callable[[Path, int, dict[str, int]], Splits]:
    def read(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
        files = {
            "train": (_arc_instruction, folder / "train.json"),
            "validation": (_arc_raw, folder / f"{prefix}-Dev.jsonl"),
            "test": (_arc_raw, folder / f"{prefix}-Test.jsonl"),
        }
        return {
            split: _mc_examples(reader(path), 4, dropped, split) for split, (reader, path) in files.items()
        }

    return read


_OBQA_HEADER = ("ID", "Question Stem", "Choices", "Complete Question", "Answer Key")
_OBQA_CHOICES = re.compile(r"^\(A\) (.*) \(B\) (.*) \(C\) (.*) \(D\) (.*)$", re.DOTALL)


def _openbookqa_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    def items(path: Path) -> Iterator[_Item]:
        for where, row in _read_tsv(path, _OBQA_HEADER):
            match = _OBQA_CHOICES.match(row[2].strip())
            if match is None:
                raise TaskDataError(f"{where}: choices are not in the '(A) ... (D) ...' format")
            yield row[1], list(match.groups()), _label_index(row[4].strip(), "ABCD", where)

    files = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
    return {split: _mc_examples(items(folder / name), 4, dropped, split) for split, name in files.items()}


def _winogrande_item(where: str, record: Mapping[str, Any]) -> _Item:
    """MosaicML schema: the two contexts differ only by the option that fills the blank."""
    contexts = _get(record, "context_options", where, list)
    if len(contexts) != 2 or not all(isinstance(c, str) for c in contexts):
        raise TaskDataError(f"{where}: 'context_options' must hold two strings")
    first, second = contexts
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    start = first.rfind(" ", 0, common) + 1  # the options start at a word boundary
    options = [first[start:], second[start:]]
    if not all(options):
        raise TaskDataError(f"{where}: cannot find the two options in 'context_options'")
    sentence = f"{first[:start]}_ {_get(record, 'continuation', where)}"
    gold = _get(record, "gold", where, int)
    return sentence, options, _label_index(gold, (0, 1), where)


def _winogrande_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    items = [_winogrande_item(w, r) for w, r in _read_jsonl(folder / "winogrande.jsonl")]
    return _carve(_mc_examples(items, 2, dropped, "all"), _SHARES_ONE_SPLIT, seed)


_BOOL_LABELS: dict[Any, int] = {"false": 0, "true": 1, False: 0, True: 1}


def _boolq_example(where: str, question: str, passage: str, label: Any) -> Example:
    key = label.strip().lower() if isinstance(label, str) else label
    if key not in _BOOL_LABELS or isinstance(key, int) and not isinstance(key, bool):
        raise TaskDataError(f"{where}: label {label!r} is outside the classes ['false', 'true']")
    return Example(true_false_prompt(question, passage), ("False", "True"), _BOOL_LABELS[key])


def _boolq_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    # train.json has no passages, so the passage-bearing val.jsonl is split three ways
    examples = [
        _boolq_example(w, _get(r, "question", w), _get(r, "passage", w), _get(r, "label", w, (str, bool)))
        for w, r in _read_jsonl(folder / "val.jsonl")
    ]
    return _carve(examples, _SHARES_ONE_SPLIT, seed)


_SST2_CHOICES = ("negative", "positive")
_RTE_CHOICES = ("entailment", "not_entailment")


def _sst2_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    def read(path: Path) -> list[Example]:
        return [
            Example(row[0].strip(), _SST2_CHOICES, _label_index(row[1].strip(), ("0", "1"), where))
            for where, row in _read_tsv(path, ("sentence", "label"))
        ]

    return _dev_as_test(read(folder / "train.tsv"), read(folder / "dev.tsv"), seed)


def _rte_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    def read(path: Path) -> list[Example]:
        return [
            Example(
                row[1].strip(),
                _RTE_CHOICES,
                _label_index(row[3].strip(), _RTE_CHOICES, where),
                row[2].strip(),
            )
            for where, row in _read_tsv(path, ("index", "sentence1", "sentence2", "label"))
        ]

    return _dev_as_test(read(folder / "train.tsv"), read(folder / "dev.tsv"), seed)


def _demo_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    splits: Splits = {}
    for split in SPLITS:
        splits[split] = [
            Example(_get(r, "text", w), _SST2_CHOICES, _label_index(_get(r, "label", w, int), (0, 1), w))
            for w, r in _read_jsonl(folder / f"demo_{split}.jsonl")
        ]
    return splits


# --------------------------------------------------------------------------- split carving

#: Shares of (train, validation, test) when a single labelled split is divided.
_SHARES_ONE_SPLIT = (0.6, 0.1, 0.3)
#: Share of the train split carved off as validation (at most this many examples).
_VALIDATION_SHARE, _VALIDATION_MAX = 0.1, 1000


def _carve(examples: list[Example], shares: tuple[float, float, float], seed: int) -> Splits:
    """Divide ``examples`` into train/validation/test by a seeded permutation (file order kept)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_validation = round(shares[1] * len(examples))
    n_test = round(shares[2] * len(examples))
    parts = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_validation],
        "train": order[n_test + n_validation :],
    }
    return {split: [examples[i] for i in sorted(parts[split])] for split in SPLITS}


def _dev_as_test(train: list[Example], dev: list[Example], seed: int) -> Splits:
    """Official dev becomes ``test``; ``validation`` is carved from ``train``."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_validation = min(_VALIDATION_MAX, math.ceil(_VALIDATION_SHARE * len(train)))
    validation = set(order[:n_validation])
    return {
        "train": [ex for i, ex in enumerate(train) if i not in validation],
        "validation": [train[i] for i in sorted(validation)],
        "test": dev,
    }


# --------------------------------------------------------------------------- Hugging Face


def _hf_rows(dataset: Any, split: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for i, row in enumerate(dataset[split]):
        yield f"Hugging Face split {split!r}, row {i}", row


def _hf_mc(dataset: Any, split: str, question_key: str) -> Iterator[_Item]:
    for where, row in _hf_rows(dataset, split):
        choices = _get(row, "choices", where, Mapping)
        answer = str(_get(row, "answerKey", where)).strip()
        yield (
            _get(row, question_key, where),
            list(choices["text"]),
            _label_index(answer, list(choices["label"]), where),
        )


def _hf_arc(config: str) -> Callable[[Callable[..., Any], int, dict[str, int]], Splits]:
    def read(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
        data = load("allenai/ai2_arc", config)
        return {s: _mc_examples(_hf_mc(data, s, "question"), 4, dropped, s) for s in SPLITS}

    return read


def _hf_openbookqa(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
    data = load("allenai/openbookqa", "main")
    return {s: _mc_examples(_hf_mc(data, s, "question_stem"), 4, dropped, s) for s in SPLITS}


def _hf_winogrande(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
    data = load("allenai/winogrande", "winogrande_m")  # test labels are hidden: dev becomes test

    def read(split: str) -> list[Example]:
        items = (
            (
                _get(row, "sentence", w),
                [_get(row, "option1", w), _get(row, "option2", w)],
                _label_index(str(_get(row, "answer", w, (str, int))), ("1", "2"), w),
            )
            for w, row in _hf_rows(data, split)
        )
        return _mc_examples(items, 2, dropped, split)

    return _dev_as_test(read("train"), read("validation"), seed)


def _hf_boolq(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
    data = load("google/boolq")

    def read(split: str) -> list[Example]:
        return [
            _boolq_example(w, _get(r, "question", w), _get(r, "passage", w), _get(r, "answer", w, bool))
            for w, r in _hf_rows(data, split)
        ]

    return _dev_as_test(read("train"), read("validation"), seed)


def _hf_glue(config: str, choices: tuple[str, ...], keys: tuple[str, ...]) -> Callable[..., Splits]:
    def read_split(data: Any, split: str) -> list[Example]:
        out = []
        for where, row in _hf_rows(data, split):
            texts = [_get(row, key, where) for key in keys]
            label = _label_index(_get(row, "label", where, int), range(len(choices)), where)
            out.append(Example(texts[0], choices, label, texts[1] if len(texts) > 1 else None))
        return out

    def read(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
        data = load("nyu-mll/glue", config)
        return _dev_as_test(read_split(data, "train"), read_split(data, "validation"), seed)

    return read


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Spec:
    kind: TaskKind
    choices: tuple[str, ...]
    read_local: Callable[[Path, int, dict[str, int]], Splits]
    read_hf: Callable[[Callable[..., Any], int, dict[str, int]], Splits] | None
    marker: str  # a file whose presence identifies the task's folder


_TASKS: dict[str, _Spec] = {
    "arc_easy": _Spec(
        "multiple_choice", tuple("ABCD"), _arc_local("ARC-Easy"), _hf_arc("ARC-Easy"), "ARC-Easy-Dev.jsonl"
    ),
    "arc_challenge": _Spec(
        "multiple_choice",
        tuple("ABCD"),
        _arc_local("ARC-Challenge"),
        _hf_arc("ARC-Challenge"),
        "ARC-Challenge-Dev.jsonl",
    ),
    "openbookqa": _Spec("multiple_choice", tuple("ABCD"), _openbookqa_local, _hf_openbookqa, "dev.tsv"),
    "winogrande": _Spec("multiple_choice", ("A", "B"), _winogrande_local, _hf_winogrande, "winogrande.jsonl"),
    "boolq": _Spec("binary", ("False", "True"), _boolq_local, _hf_boolq, "val.jsonl"),
    "sst2": _Spec(
        "classification",
        _SST2_CHOICES,
        _sst2_local,
        _hf_glue("sst2", _SST2_CHOICES, ("sentence",)),
        "train.tsv",
    ),
    "rte": _Spec(
        "classification",
        _RTE_CHOICES,
        _rte_local,
        _hf_glue("rte", _RTE_CHOICES, ("sentence1", "sentence2")),
        "train.tsv",
    ),
    "demo": _Spec("classification", _SST2_CHOICES, _demo_local, None, "demo_train.jsonl"),
}

#: Names accepted by :func:`load_task`.
KNOWN_TASKS: tuple[str, ...] = tuple(_TASKS)


def demo_data_dir() -> Path:
    """The folder holding the bundled ``demo`` task files.

    Example:
        >>> (demo_data_dir() / "demo_train.jsonl").is_file()
        True
    """
    return Path(str(importlib.resources.files("flaplace") / "data"))


def _task_folder(name: str, path: Path, marker: str) -> Path:
    """Accept the task's own folder or a parent holding ``<name>/``."""
    if not (path / marker).is_file() and (path / name / marker).is_file():
        return path / name
    if not path.is_dir():
        raise FileNotFoundError(f"data folder for task {name!r} not found: {path}")
    return path


def _hf_loader(name: str) -> Callable[..., Any]:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise FileNotFoundError(
            f"no data path for task {name!r}: pass path=<folder with its files> (e.g. ../shared/data/{name}) "
            f"or set {DATA_DIR_ENV}; loading by Hugging Face name needs the `datasets` library, "
            "which is not installed"
        ) from None

    def load(*args: Any) -> Any:
        try:
            return datasets.load_dataset(*args)
        except Exception as err:  # network, hub or cache failures all mean "pass a path"
            raise FileNotFoundError(
                f"could not load task {name!r} from Hugging Face {args} ({type(err).__name__}: {err}); "
                f"pass path=<folder with its files> (e.g. ../shared/data/{name}) or set {DATA_DIR_ENV}"
            ) from err

    return load


def _subsample(examples: list[Example], limit: int | None, seed: int, split: str) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(f"{split}:{seed}").sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _limits(max_examples: Mapping[str, int | None] | int | None) -> dict[str, int | None]:
    if max_examples is None or isinstance(max_examples, int):
        limits: dict[str, int | None] = dict.fromkeys(SPLITS, max_examples)
    elif isinstance(max_examples, Mapping):
        unknown = set(max_examples) - set(SPLITS)
        if unknown:
            raise ValueError(f"max_examples has unknown splits {sorted(unknown)}; splits are {list(SPLITS)}")
        limits = {split: max_examples.get(split) for split in SPLITS}
    else:
        raise TypeError(f"max_examples must be an int, a dict or None, got {type(max_examples).__name__}")
    for split, limit in limits.items():
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"max_examples[{split!r}] must be a positive int or None, got {limit!r}")
    return limits


def load_task(
    name: str,
    path: str | Path | None = None,
    *,
    max_examples: Mapping[str, int | None] | int | None = None,
    seed: int = 0,
) -> Task:
    """Load task ``name`` with ``train``, ``validation`` and ``test`` splits.

    ``path`` is the folder with the task's files (e.g. ``../shared/data/arc_easy``;
    a parent folder holding ``<name>/`` also works). Without ``path`` the
    folder ``$FLAPLACE_DATA_DIR/<name>`` is used when that variable is set,
    the bundled files for ``demo``, and otherwise the Hugging Face ``datasets``
    library when it is installed and the hub is reachable.

    ``max_examples`` caps every split (an int) or the named splits (a dict) by a
    seeded random subset, kept in file order. ``seed`` also fixes the
    deterministic carving of splits that the files do not provide.

    Raises ``ValueError`` for an unknown task, ``FileNotFoundError`` for a
    missing file or source, and :class:`TaskDataError` (a ``ValueError``)
    naming the file and line for malformed records or labels outside the
    classes.

    Example:
        >>> task = load_task("demo", max_examples={"train": 100})
        >>> task.kind, task.n_classes, len(task.split("train"))
        ('classification', 2, 100)
        >>> task.choices
        ('negative', 'positive')
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    spec = _TASKS[name]
    limits = _limits(max_examples)
    dropped: dict[str, int] = {}
    if path is None and os.environ.get(DATA_DIR_ENV) and name != "demo":
        path = Path(os.environ[DATA_DIR_ENV])
    if path is None and name == "demo":
        path = demo_data_dir()
    if path is not None:
        folder = _task_folder(name, Path(path), spec.marker)
        splits, source = spec.read_local(folder, seed, dropped), str(folder)
    else:
        assert spec.read_hf is not None
        splits, source = spec.read_hf(_hf_loader(name), seed, dropped), "huggingface"
    for split in SPLITS:
        if not splits.get(split):
            raise TaskDataError(f"task {name!r}: split {split!r} has no examples (source: {source})")
        splits[split] = _subsample(splits[split], limits[split], seed, split)
    return Task(name, spec.kind, len(spec.choices), splits, spec.choices, dropped, source)
