"""Test-suite setup.

The jaxtyping import hook is installed BEFORE flaplace is imported, so that every function of
the package is wrapped with jaxtyping + beartype: annotated shapes, dtypes and types are checked
at run time in the tests (the library itself never checks them). The hook stays installed for the
whole session, so submodules imported later by test files are checked too.
"""

from __future__ import annotations

import sys

import pytest
import torch
from jaxtyping import install_import_hook

_already = sorted(name for name in sys.modules if name == "flaplace" or name.startswith("flaplace."))
if _already:
    raise RuntimeError(
        f"flaplace was imported before tests/conftest.py could install the type-checking hook: {_already}"
    )

TYPECHECK_HOOK = install_import_hook("flaplace", "beartype.beartype")

import flaplace  # noqa: E402, F401

torch.set_num_threads(2)

DEFAULT_SEED = 0


def seeded(seed: int = DEFAULT_SEED) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``seed`` (and the global RNG seeded too)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded ``torch.Generator``; the global torch RNG is seeded as well."""
    return seeded(DEFAULT_SEED)


@pytest.fixture
def seed() -> int:
    """The seed used by :func:`rng` (for code that takes an integer seed)."""
    torch.manual_seed(DEFAULT_SEED)
    return DEFAULT_SEED


def run_without_typechecks(source: str, timeout: float = 600) -> str:
    """Run ``source`` in a fresh Python without the type-checking hook; return its stdout.

    The jaxtyping wrappers the hook adds cannot be traced by dynamo without graph
    breaks, so compilation checks (``torch._dynamo.explain``) run here, on the
    library exactly as users import it.
    """
    import os
    import pathlib
    import subprocess
    import sys

    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{done.stderr[-4000:]}")
    return done.stdout
