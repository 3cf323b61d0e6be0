"""Tasks: evaluation data sets read from their standard files into typed examples.

[`load_task`][flaplace.app.tasks.registry.load_task] returns a
[`Task`][flaplace.app.tasks.examples.Task] with ``train``, ``validation`` and ``test``
splits of [`Example`][flaplace.app.tasks.examples.Example]s. The package is split into
[`examples`][flaplace.app.tasks.examples] (the records and batching),
[`prompts`][flaplace.app.tasks.prompts], [`readers`][flaplace.app.tasks.readers] (one per data
set), [`user`][flaplace.app.tasks.user] (the user's own files) and the [`registry`][flaplace.app.tasks.registry].
"""

from flaplace.app.tasks.examples import DATA_DIR_ENV, SPLITS, Example, Task, TaskDataError, TaskKind, batches
from flaplace.app.tasks.prompts import (
    LETTERS,
    MC_INSTRUCTION,
    TRUE_FALSE_INSTRUCTION,
    format_prompt,
    multiple_choice_prompt,
    true_false_prompt,
)
from flaplace.app.tasks.registry import KNOWN_TASKS, demo_data_dir, load_task
from flaplace.app.tasks.user import USER_TASK, UserSpec

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_TASKS",
    "LETTERS",
    "MC_INSTRUCTION",
    "SPLITS",
    "TRUE_FALSE_INSTRUCTION",
    "Example",
    "Task",
    "TaskDataError",
    "TaskKind",
    "USER_TASK",
    "UserSpec",
    "batches",
    "demo_data_dir",
    "format_prompt",
    "load_task",
    "multiple_choice_prompt",
    "true_false_prompt",
]
