"""Stage checkpoints: a key per stage, a marker file, load or compute, atomic writes.

A stage's result is reused when its marker (``<stage>.json``) carries the stage's key (a
hash of the options it depends on, [`stage_key`][flaplace.app.config.stage_key]) and its
data file exists. Every file is written to a temporary name and renamed into place, the
data file before the marker, so a run killed at any moment leaves either a complete
stage or none: the next run recomputes what is missing and reuses the rest.

Examples:
    >>> import tempfile
    >>> cache = StageCache(Path(tempfile.mkdtemp()))
    >>> cache.get("prior", "k1", lambda: (None, {"prior_precision": 2.0}))[1]["prior_precision"]
    2.0
    >>> cache.get("prior", "k1", lambda: (None, {"prior_precision": 3.0}))[1]["prior_precision"]
    2.0
    >>> cache.status
    {'prior': 'loaded'}
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

T = TypeVar("T")

#: The part of a temporary file's name between the target's name and the process id.
TMP_INFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp(), "results.json")
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("{}")
        >>> target.read_text()
        '{}'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed run left in ``folder``; return them.

    Examples:
        >>> import tempfile
        >>> remove_stale_temporaries(Path(tempfile.mkdtemp()))
        []
    """
    stale = sorted(folder.glob(f".*{TMP_INFIX}*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def json_default(value: Any) -> Any:
    """JSON for the values a run records: tuples and sets as lists, paths as text, tensors as lists.

    Examples:
        >>> json.dumps({"targets": ("query", "value")}, default=json_default)
        '{"targets": ["query", "value"]}'
    """
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically.

    Examples:
        >>> import tempfile
        >>> write_json(Path(tempfile.mkdtemp(), "x.json"), {"a": 1})
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=json_default) + "\n", encoding="utf-8")


def read_marker(path: Path, key: str) -> dict[str, Any] | None:
    """The stage record at ``path`` when it exists and carries ``key``, else ``None``.

    Examples:
        >>> read_marker(Path("no/such/marker.json"), "k") is None
        True
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def stage_seconds(marker: Path) -> float | None:
    """How long a stage took when its checkpoint was computed (possibly by an earlier run).

    Examples:
        >>> stage_seconds(Path("no/such/marker.json")) is None
        True
    """
    try:
        return float(json.loads(marker.read_text(encoding="utf-8"))["seconds"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


class StageCache:
    """The checkpoints of one run's stages in ``folder``; ``status`` says which were reused.

    Examples:
        >>> import tempfile
        >>> cache = StageCache(Path(tempfile.mkdtemp()))
        >>> _ = cache.get("map", "key", lambda: (None, {"losses": [1.0]}))
        >>> cache.status
        {'map': 'computed'}
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.status: dict[str, str] = {}
        remove_stale_temporaries(folder)

    def marker(self, stage: str) -> Path:
        """The marker file of ``stage``.

        Examples:
            >>> StageCache(Path("ckpt")).marker("map").name
            'map.json'
        """
        return self.folder / f"{stage}.json"

    def has(self, stage: str, key: str, *, data: bool) -> bool:
        """Whether `get` would load ``stage`` (its marker carries ``key``, and its data file exists if ``data``).

        Examples:
            >>> StageCache(Path("no/such/folder")).has("map", "key", data=True)
            False
        """
        found = read_marker(self.marker(stage), key) is not None
        return found and (not data or (self.folder / f"{stage}.safetensors").is_file())

    def get(
        self,
        stage: str,
        key: str,
        compute: Callable[[], tuple[T, dict[str, Any]]],
        *,
        save: Callable[[Path, T], None] | None = None,
        load: Callable[[Path], T] | None = None,
    ) -> tuple[T, dict[str, Any]]:
        """Load stage ``stage`` when its checkpoint carries ``key``, else compute and store it.

        Args:
            stage: the stage's name (the files are ``<stage>.json`` and ``<stage>.safetensors``).
            key: the stage's key.
            compute: ``() -> (value, record)``; the record (JSON) goes into the marker.
            save: writes the value to a path (none: the record is the whole result).
            load: reads the value back from that path.

        Returns:
            ``(value, record)``; ``value`` is ``None`` for a loaded stage without ``load``.

        Examples:
            >>> import tempfile
            >>> cache = StageCache(Path(tempfile.mkdtemp()))
            >>> cache.get("prior", "k", lambda: (1.5, {"p": 1.5}))
            (1.5, {'p': 1.5})
        """
        data = self.folder / f"{stage}.safetensors"
        record = read_marker(self.marker(stage), key)
        if record is not None and (save is None or data.is_file()):  # as in `has`
            self.status[stage] = "loaded"
            return (load(data) if load is not None else None), record  # type: ignore[return-value]
        started = time.perf_counter()
        value, record = compute()
        if save is not None:
            with atomic_path(data) as tmp:
                save(tmp, value)
        seconds = time.perf_counter() - started
        write_json(self.marker(stage), {"key": key, **record, "seconds": seconds})
        self.status[stage] = "computed"
        return value, record
