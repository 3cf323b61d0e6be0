"""Packaging: installing flaplace keeps the installed torch; declared minimum versions; LICENSE, py.typed.

The install check is a dry run of pip into the CURRENT environment, offline (``--no-index``): every
requirement flaplace and its extras declare must resolve to what is installed, with nothing to install
or replace, so no requirement pins another torch; where setuptools >= 77 (the declared build backend)
is installed, ``pip install -e .[extras] --no-build-isolation`` is dry-run too and must list flaplace
alone. A requirement the installed torch does not meet makes the same command fail (checked too, so
the test can fail).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

try:  # Python 3.11+
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dry_run(tmp_path: Path, *requirements: str) -> subprocess.CompletedProcess:
    report = tmp_path / "report.json"
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "--quiet", "--report", str(report), *requirements],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installable_extras() -> list[str]:
    """The extras whose requirements are all installed here (CI installs test and hf)."""
    from packaging.requirements import Requirement

    extras = []
    for extra, requirements in pyproject()["project"]["optional-dependencies"].items():
        ok = True
        for text in requirements:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate():
                continue
            version = installed(req.name)
            if version is None or not req.specifier.contains(version, prereleases=True):
                ok = False
        if ok:
            extras.append(extra)
    return extras


def declared_requirements(extras: list[str]) -> list[str]:
    project = pyproject()["project"]
    out = list(project["dependencies"])
    for extra in extras:
        out += project["optional-dependencies"][extra]
    return out


def report_names(tmp_path: Path) -> list[str]:
    report = json.loads((tmp_path / "report.json").read_text())
    return sorted(item["metadata"]["name"].lower() for item in report["install"])


def test_installing_flaplace_keeps_the_installed_torch(tmp_path):
    extras = installable_extras()
    assert "hf" in extras, "the hf extra's requirements must be installed to run this test"
    # 1. every requirement of flaplace and of these extras resolves to what is installed: nothing
    #    to install or replace (no build needed, so it runs in any environment)
    requirements = declared_requirements(extras)
    done = dry_run(tmp_path, *requirements)
    assert done.returncode == 0, (
        f"pip could not resolve {requirements} to the installed packages:\n{done.stderr[-3000:]}"
    )
    assert report_names(tmp_path) == [], (
        f"installing flaplace[{','.join(extras)}] would change: {report_names(tmp_path)}"
    )
    # 2. the check can fail: a requirement the installed torch does not meet is not resolved
    other = dry_run(tmp_path, *requirements, f"torch!={installed('torch')}")
    assert other.returncode != 0
    # 3. the package itself, editable, where the build backend it declares is installed
    setuptools_version = installed("setuptools")
    from packaging.version import Version

    if setuptools_version is not None and Version(setuptools_version) >= Version("77"):
        target = f".[{','.join(extras)}]"
        done = dry_run(tmp_path, "-e", target)
        assert done.returncode == 0, done.stderr[-3000:]
        assert report_names(tmp_path) == ["flaplace"], (
            f"pip install -e {target} would also change: {report_names(tmp_path)}"
        )


def test_torch_is_required_once_and_only_as_torch_at_least_2_5():
    project = pyproject()["project"]
    everything = list(project["dependencies"])
    for requirements in project["optional-dependencies"].values():
        everything += requirements
    torch_requirements = [r for r in everything if re.match(r"torch\b(?![-_])", r)]
    assert torch_requirements == ["torch>=2.5"]


def test_declared_minimum_versions_are_met_and_their_features_exist(tmp_path):
    from packaging.requirements import Requirement
    from packaging.version import Version

    hf = {Requirement(r).name: Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["hf"]}
    assert str(hf["transformers"].specifier) == ">=4.56"
    assert str(hf["peft"].specifier) == ">=0.18"
    assert Version(installed("transformers")) >= Version("4.56")
    assert Version(installed("peft")) >= Version("0.18")
    # what the minimum stands for: from_pretrained(dtype=...) (transformers 4.56; older ones ignore it) ...
    import inspect

    import torch
    from tiny_models import tiny_base_model
    from transformers import AutoModelForSequenceClassification

    tiny_base_model("bert").save_pretrained(tmp_path / "bert")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert", dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    # ... and the LoRA options flaplace passes
    import peft

    fields = set(inspect.signature(peft.LoraConfig).parameters)
    assert {
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "modules_to_save",
        "fan_in_fan_out",
    } <= fields


def test_tomli_is_declared_for_python_3_10():
    deps = pyproject()["project"]["dependencies"]
    assert "tomli; python_version < '3.11'" in deps


def test_license_and_py_typed_ship():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "flaplace" / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["flaplace"]
    assert pyproject()["project"]["license"] == "Apache-2.0"
