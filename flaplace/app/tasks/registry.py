"""The task registry: task names, where their files are, and [`load_task`][flaplace.app.tasks.registry.load_task]."""

from __future__ import annotations

import importlib
import importlib.resources
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flaplace.app.tasks.examples import DATA_DIR_ENV, SPLITS, Example, Splits, Task, TaskDataError, TaskKind
from flaplace.app.tasks.readers import (
    RTE_CHOICES,
    SST2_CHOICES,
    arc_local,
    boolq_local,
    demo_local,
    hf_arc,
    hf_boolq,
    hf_glue,
    hf_openbookqa,
    hf_winogrande,
    openbookqa_local,
    rte_local,
    sst2_local,
    winogrande_local,
)
from flaplace.app.tasks.user import USER_TASK, UserSpec, read_user_splits


@dataclass(frozen=True)
class _Spec:
    kind: TaskKind
    choices: tuple[str, ...]
    read_local: Callable[[Path, int, dict[str, int]], Splits]
    read_hf: Callable[[Callable[..., Any], int, dict[str, int]], Splits] | None
    marker: str  # a file whose presence identifies the task's folder
    answers: tuple[str, ...] = ()  # a causal LM's answer words, where the choices are not single tokens


_TASKS: dict[str, _Spec] = {
    "arc_easy": _Spec(
        "multiple_choice", tuple("ABCD"), arc_local("ARC-Easy"), hf_arc("ARC-Easy"), "ARC-Easy-Dev.jsonl"
    ),
    "arc_challenge": _Spec(
        "multiple_choice",
        tuple("ABCD"),
        arc_local("ARC-Challenge"),
        hf_arc("ARC-Challenge"),
        "ARC-Challenge-Dev.jsonl",
    ),
    "openbookqa": _Spec("multiple_choice", tuple("ABCD"), openbookqa_local, hf_openbookqa, "dev.tsv"),
    "winogrande": _Spec("multiple_choice", ("A", "B"), winogrande_local, hf_winogrande, "winogrande.jsonl"),
    "boolq": _Spec("binary", ("False", "True"), boolq_local, hf_boolq, "val.jsonl"),
    "sst2": _Spec(
        "classification",
        SST2_CHOICES,
        sst2_local,
        hf_glue("sst2", SST2_CHOICES, ("sentence",)),
        "train.tsv",
    ),
    "rte": _Spec(
        "classification",
        RTE_CHOICES,
        rte_local,
        hf_glue("rte", RTE_CHOICES, ("sentence1", "sentence2")),
        "train.tsv",
        answers=("yes", "no"),
    ),
    "demo": _Spec("classification", SST2_CHOICES, demo_local, None, "demo_train.jsonl"),
}

#: Names accepted by `load_task` (``user``: the user's own files, see [`user`][flaplace.app.tasks.user]).
KNOWN_TASKS: tuple[str, ...] = (*_TASKS, USER_TASK)


def demo_data_dir() -> Path:
    """The folder holding the bundled ``demo`` task files.

    Examples:
        >>> (demo_data_dir() / "demo_train.jsonl").is_file()
        True
    """
    return Path(str(importlib.resources.files("flaplace") / "data"))


def _task_folder(name: str, path: Path, marker: str) -> Path:
    """Accept the task's own folder or a parent holding ``<name>/``."""
    if not (path / marker).is_file() and (path / name / marker).is_file():
        return path / name
    if path.is_file():
        raise FileNotFoundError(
            f"task {name!r} reads a folder of its files, but {path} is a file; for your own data file "
            f"use --task {USER_TASK} (or leave out --task)"
        )
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
    path: str | Path | Any | None = None,
    *,
    max_examples: Mapping[str, int | None] | int | None = None,
    seed: int = 0,
    user: UserSpec | None = None,
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

    Task ``user`` reads the user's own data: ``path`` is a ``.jsonl``, ``.csv`` or
    ``.tsv`` training file, a ``datasets.Dataset``, a ``datasets.DatasetDict`` (its splits)
    or a folder written by ``save_to_disk``, and ``user`` (a
    [`UserSpec`][flaplace.app.tasks.user.UserSpec]) names its columns and the optional
    validation and test files; see [`user`][flaplace.app.tasks.user] for how missing splits
    are carved.

    Raises ``ValueError`` for an unknown task, ``FileNotFoundError`` for a
    missing file or source, and `TaskDataError` (a ``ValueError``)
    naming the file and line for malformed records or labels outside the
    classes.

    Examples:
        >>> task = load_task("demo", max_examples={"train": 100})
        >>> task.kind, task.n_classes, len(task.split("train"))
        ('classification', 2, 100)
        >>> task.choices
        ('negative', 'positive')
    """
    if name not in KNOWN_TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    limits = _limits(max_examples)
    dropped: dict[str, int] = {}
    if name == USER_TASK:
        if path is None:
            raise FileNotFoundError(
                f"task {USER_TASK!r} reads your own data: give --data-path <file.jsonl|.csv|.tsv, or a "
                "folder written by datasets' save_to_disk> (in Python also a Dataset or DatasetDict)"
            )
        kind, choices, splits = read_user_splits(path, user or UserSpec(), seed)
        for split in SPLITS:
            splits[split] = _subsample(splits[split], limits[split], seed, split)
        kind_: TaskKind = "multiple_choice" if kind == "multiple_choice" else "classification"
        source = str(path) if isinstance(path, str | os.PathLike) else f"datasets.{type(path).__name__}"
        return Task(USER_TASK, kind_, len(choices), splits, choices, dropped, source)
    spec = _TASKS[name]
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
    return Task(name, spec.kind, len(spec.choices), splits, spec.choices, dropped, source, spec.answers)
