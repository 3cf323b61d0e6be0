"""Readers: the standard files of each data set, read into typed examples.

* ``multiple_choice`` (ARC-Easy, ARC-Challenge, OpenBookQA, WinoGrande): the prompt lists
  the options after letters and the answers are the letters (``"A"``, ``"B"``, ...). Items
  whose number of options differs from the task's usual count are left out (counted in
  ``Task.n_dropped``).
* ``binary`` (BoolQ): the prompt asks for True or False; answers ``("False", "True")``.
* ``classification`` (SST-2, RTE and the bundled ``demo``): raw input text (and
  ``text_pair`` for sentence pairs) for sequence-classification models; the answers are
  the label names.

Where a data set has no labelled test split, its official development split is used as
``test`` and a validation split is carved from ``train``; where only one labelled split
exists (WinoGrande dev, BoolQ dev with passages) it is split deterministically with
``seed``. See the "Tasks and data" page for the full scheme. Tokenisation belongs to the
Hugging Face glue ([`encode`][flaplace.app.hf.encode]), not to this module.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from flaplace.app.tasks.examples import DATA_DIR_ENV, SPLITS, Example, Splits, TaskDataError
from flaplace.app.tasks.prompts import LETTERS, multiple_choice_prompt, true_false_prompt

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


def arc_local(prefix: str) -> Callable[[Path, int, dict[str, int]], Splits]:
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


def openbookqa_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
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


def winogrande_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    items = [_winogrande_item(w, r) for w, r in _read_jsonl(folder / "winogrande.jsonl")]
    return _carve(_mc_examples(items, 2, dropped, "all"), _SHARES_ONE_SPLIT, seed)


_BOOL_LABELS: dict[Any, int] = {"false": 0, "true": 1, False: 0, True: 1}


def _boolq_example(where: str, question: str, passage: str, label: Any) -> Example:
    key = label.strip().lower() if isinstance(label, str) else label
    if key not in _BOOL_LABELS or isinstance(key, int) and not isinstance(key, bool):
        raise TaskDataError(f"{where}: label {label!r} is outside the classes ['false', 'true']")
    return Example(true_false_prompt(question, passage), ("False", "True"), _BOOL_LABELS[key])


def boolq_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    # train.json has no passages, so the passage-bearing val.jsonl is split three ways
    examples = [
        _boolq_example(w, _get(r, "question", w), _get(r, "passage", w), _get(r, "label", w, (str, bool)))
        for w, r in _read_jsonl(folder / "val.jsonl")
    ]
    return _carve(examples, _SHARES_ONE_SPLIT, seed)


SST2_CHOICES = ("negative", "positive")
RTE_CHOICES = ("entailment", "not_entailment")


def sst2_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    def read(path: Path) -> list[Example]:
        return [
            Example(row[0].strip(), SST2_CHOICES, _label_index(row[1].strip(), ("0", "1"), where))
            for where, row in _read_tsv(path, ("sentence", "label"))
        ]

    return _dev_as_test(read(folder / "train.tsv"), read(folder / "dev.tsv"), seed)


def rte_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    def read(path: Path) -> list[Example]:
        return [
            Example(
                row[1].strip(),
                RTE_CHOICES,
                _label_index(row[3].strip(), RTE_CHOICES, where),
                row[2].strip(),
            )
            for where, row in _read_tsv(path, ("index", "sentence1", "sentence2", "label"))
        ]

    return _dev_as_test(read(folder / "train.tsv"), read(folder / "dev.tsv"), seed)


def demo_local(folder: Path, seed: int, dropped: dict[str, int]) -> Splits:
    splits: Splits = {}
    for split in SPLITS:
        splits[split] = [
            Example(_get(r, "text", w), SST2_CHOICES, _label_index(_get(r, "label", w, int), (0, 1), w))
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


def hf_arc(config: str) -> Callable[[Callable[..., Any], int, dict[str, int]], Splits]:
    def read(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
        data = load("allenai/ai2_arc", config)
        return {s: _mc_examples(_hf_mc(data, s, "question"), 4, dropped, s) for s in SPLITS}

    return read


def hf_openbookqa(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
    data = load("allenai/openbookqa", "main")
    return {s: _mc_examples(_hf_mc(data, s, "question_stem"), 4, dropped, s) for s in SPLITS}


def hf_winogrande(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
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


def hf_boolq(load: Callable[..., Any], seed: int, dropped: dict[str, int]) -> Splits:
    data = load("google/boolq")

    def read(split: str) -> list[Example]:
        return [
            _boolq_example(w, _get(r, "question", w), _get(r, "passage", w), _get(r, "answer", w, bool))
            for w, r in _hf_rows(data, split)
        ]

    return _dev_as_test(read("train"), read("validation"), seed)


def hf_glue(config: str, choices: tuple[str, ...], keys: tuple[str, ...]) -> Callable[..., Splits]:
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
