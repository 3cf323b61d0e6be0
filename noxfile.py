"""Development sessions: `nox` runs tests and lint; `nox -s NAME` runs one session.

Every session installs torch==2.13.0 first (a CPU wheel; an unpinned torch resolves to a multi-GB
CUDA build) and then installs everything else under a constraint file that keeps it there.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH_PIN = "torch==2.13.0"
ROOT = Path(__file__).parent

# laplace-torch (and two of its dependencies) require torchvision, which would replace the CPU
# torch with a CUDA build: install these without their dependencies, and their real ones beside.
NO_DEPS_BENCH = ["laplace-torch", "backpack-for-pytorch", "curvlinops-for-pytorch"]
BENCH_DEPS = [
    "asdfghjkl==0.1a4",
    "unfoldNd",
    "einconv",
    "linear_operator",
    "opt-einsum",
    "scipy",
    "torchmetrics",
]


def _constraints(session: nox.Session) -> str:
    """A pip constraint file, in the session's own tmp folder, that holds torch at its pin."""
    path = Path(session.create_tmp()) / "constraints.txt"
    path.write_text(TORCH_PIN + "\n")
    return str(path)


def _install(session: nox.Session, *extras: str) -> str:
    """Install torch first, then flaplace (editable) with ``extras``; return the constraint file."""
    constraints = _constraints(session)
    session.install(TORCH_PIN)
    target = f".[{','.join(extras)}]" if extras else "."
    session.install("-c", constraints, "-e", target)
    return constraints


@nox.session
def tests(session: nox.Session) -> None:
    """The default test suite (slow tests deselected), on two xdist workers."""
    _install(session, "test", "hf")
    session.run("pytest", "-p", "no:cacheprovider", "-n", "2", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Only the tests marked ``slow``."""
    _install(session, "test", "hf")
    session.run("pytest", "-p", "no:cacheprovider", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check (no torch needed)."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the flaplace package."""
    constraints = _install(session, "hf")
    session.install("-c", constraints, "mypy")
    session.run("mypy", "flaplace")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings are errors."""
    _install(session, "docs")
    session.run("mkdocs", "build", "--strict", "--site-dir", session.create_tmp() + "/site")


@nox.session
def bench(session: nox.Session) -> None:
    """Install the comparison libraries and run every ``benchmarks/*.py`` script."""
    constraints = _install(session, "bench", "hf")
    session.install("-c", constraints, *BENCH_DEPS)
    session.install("--no-deps", *NO_DEPS_BENCH)
    # Files starting with "_" are shared helpers (benchmarks/_common.py), not benchmarks.
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        session.skip("no benchmarks/*.py scripts yet")
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)
