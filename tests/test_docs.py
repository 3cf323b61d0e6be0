"""The docs: the site builds with ``mkdocs build --strict``, and the ``Examples:`` blocks run as doctests."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flaplace.app.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]

#: Modules whose every ``Examples:`` block runs (lines that need a real model are marked
#: ``# doctest: +SKIP``). The other modules' examples are shown in the docs but not run yet.
DOCTESTED = (
    "flaplace.typing",
    "flaplace.fisher",
    "flaplace.jacobian_cache",
    "flaplace.metrics",
    "flaplace.app.config",
    "flaplace.app.checkpoints",
    "flaplace.app.stages",
    "flaplace.app.pipeline",
    "flaplace.app.report",
    "flaplace.app.cli",
    "flaplace.app.tasks.examples",
    "flaplace.app.tasks.prompts",
    "flaplace.app.tasks.registry",
)

RESULTS = {
    "config": {"link": "probit"},
    "metrics": {
        "map": {"accuracy": 0.9, "nll": 0.3, "ece": 0.05, "brier": 0.15},
        "laplace": {"accuracy": 0.9, "nll": 0.25, "ece": 0.02, "brier": 0.14},
    },
}


@pytest.mark.parametrize("name", DOCTESTED)
def test_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    namespace = {"torch": torch, "load_task": load_task, "results": RESULTS}
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    outcome = doctest.testmod(module, extraglobs=namespace, optionflags=flags, report=True)
    assert outcome.attempted > 0, f"{name} has no examples"
    assert outcome.failed == 0, f"{outcome.failed} of {outcome.attempted} examples of {name} fail"


def test_no_sphinx_roles_and_no_outside_notes():
    files = [*ROOT.glob("flaplace/**/*.py"), *ROOT.glob("docs/*.md")]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r":(class|func|mod|data|meth|attr|exc):`", text), path
        assert "DESIGN" not in text, path
        assert not re.search(r"^\s*Example:$", text, flags=re.M), f"{path}: use 'Examples:'"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    page = (tmp_path / "site" / "conventions" / "index.html").read_text(encoding="utf-8")
    assert "arithmatex" in page and "assets/katex/katex.min.js" in page
    assert (tmp_path / "site" / "assets" / "katex" / "katex.min.js").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for module in ("flaplace.app.config", "flaplace.app.pipeline", "flaplace.app.hf", "flaplace.app.cli"):
        assert f'id="{module}"' in api, module
