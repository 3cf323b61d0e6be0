"""The package's layout: small modules and scripts, and no private names imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: About how long a module of the package, and a benchmark script, may grow before it is split.
MODULE_LINES = 450
SCRIPT_LINES = 700


def test_modules_and_benchmark_scripts_stay_small():
    modules = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "flaplace").rglob("*.py")}
    scripts = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "benchmarks").glob("*.py")}
    assert {str(p.relative_to(ROOT)): n for p, n in modules.items() if n > MODULE_LINES} == {}
    assert {str(p.relative_to(ROOT)): n for p, n in scripts.items() if n > SCRIPT_LINES} == {}


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in (ROOT / "flaplace").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flaplace"):
                offenders += [
                    f"{path.relative_to(ROOT)}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and alias.name != "__version__"
                ]
    assert offenders == []
