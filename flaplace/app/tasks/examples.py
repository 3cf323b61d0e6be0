"""Examples and tasks: the typed records every reader produces, and batching.

A [`Task`][flaplace.app.tasks.examples.Task] holds ``train``/``validation``/``test`` lists of
[`Example`][flaplace.app.tasks.examples.Example]. Every example of a task shares the same answer
strings (``Task.choices``), so a model scores a fixed set of ``n_classes`` answers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeAlias

TaskKind: TypeAlias = Literal["multiple_choice", "binary", "classification"]

#: The split names every task provides.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Environment variable naming a folder with one sub-folder per task.
DATA_DIR_ENV = "FLAPLACE_DATA_DIR"


class TaskDataError(ValueError):
    """A data file is malformed or holds a label outside the task's classes."""


class Example(NamedTuple):
    """One labelled example.

    ``text`` is the full prompt (multiple choice, binary) or the raw input text
    (classification); ``text_pair`` the second sentence of a pair task (RTE),
    else ``None``. ``choices`` are the answer strings, ``label`` the index of the
    correct one.

    Examples:
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
    their number; ``answers``, where given, are the words a causal LM answers with
    instead (one token each: RTE's class names ``entailment`` and ``not_entailment`` are not,
    so it answers ``yes`` and ``no``), see `answer_words`; ``n_dropped`` counts, per split (``"all"`` when the items
    were dropped before a single file was divided into splits), the items left
    out because their number of options differed from ``n_classes``; ``source`` says where
    the data was read from.

    Examples:
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
    answers: tuple[str, ...] = ()

    @property
    def answer_words(self) -> tuple[str, ...]:
        """The words a causal LM scores, one per class: ``answers`` if given, else ``choices``.

        Examples:
            >>> Task("pairs", "classification", 2, {}, ("entailment", "not_entailment"),
            ...      answers=("yes", "no")).answer_words
            ('yes', 'no')
        """
        return self.answers or self.choices

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
        if self.answers and len(self.answers) != self.n_classes:
            raise ValueError(
                f"task {self.name!r}: {len(self.answers)} answers {self.answers} but n_classes={self.n_classes}"
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

        Examples:
            >>> task = load_task("demo")
            >>> len(task.split("test"))
            200
        """
        if name not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]


Splits: TypeAlias = dict[str, list[Example]]


def batches(
    examples: Sequence[Example], batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[list[Example]]:
    """Yield lists of at most ``batch_size`` examples (the last one may be shorter).

    Examples:
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
