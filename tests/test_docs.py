"""The docs: the site builds with ``mkdocs build --strict``, and the ``Examples:`` blocks run as doctests."""

from __future__ import annotations

import doctest
import functools
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
#: ``# doctest: +SKIP``); the core modules' examples see the tiny objects of `tiny_namespace`.
#: The other modules' examples are shown in the docs but not run yet.
DOCTESTED = (
    "flaplace.typing",
    "flaplace.params",
    "flaplace.sharding",
    "flaplace.evaluation",
    "flaplace.scoring",
    "flaplace.validation",
    "flaplace.jacobians",
    "flaplace.kfac",
    "flaplace.kfac_state",
    "flaplace.lowrank",
    "flaplace.posterior",
    "flaplace.posterior_io",
    "flaplace.evidence",
    "flaplace.predictive",
    "flaplace.links",
    "flaplace.sampling",
    "flaplace.fisher",
    "flaplace.jacobian_cache",
    "flaplace.metrics",
    "flaplace.app.config",
    "flaplace.app.checkpoints",
    "flaplace.app.stages",
    "flaplace.app.pipeline",
    "flaplace.app.distributed",
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


@functools.cache
def tiny_namespace() -> dict:
    """The names the core modules' examples use, on a tiny model: one 3 x 4 linear layer, 6 examples."""
    import flaplace
    from flaplace.lowrank import empty_sketch, merge_rows

    g = torch.Generator().manual_seed(0)
    params = {"fc.weight": torch.randn(3, 4, dtype=torch.float64, generator=g)}

    def model_fn(p, batch):
        return torch.nn.functional.linear(batch[0], p["fc.weight"])

    x, y = torch.randn(6, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (6,), generator=g)
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    factors, state = flaplace.fit_kfac(
        model_fn, params, loader, fisher="exact", lr_threshold=None, progress=False
    )
    posterior = flaplace.make_posterior(factors, params, 1.0)
    f_mu, f_var = flaplace.linearised_predictive(model_fn, posterior, (x, y))
    s1, s2 = (
        merge_rows(
            empty_sketch(5, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64, generator=g)
        )
        for _ in range(2)
    )
    return {
        "flaplace": flaplace, "params": params, "model_fn": model_fn, "f": model_fn, "batch": (x, y),
        "loader": loader, "val_batches": loader, "with_prior_precision": flaplace.with_prior_precision, "factors": factors, "state": state, "posterior": posterior, "ll": state.log_likelihood,
        "name": "fc.weight", "f_mu": f_mu, "f_var": f_var, "s1": s1, "s2": s2,
        "linearised_predictive": flaplace.linearised_predictive,
        "log_marginal_likelihood": flaplace.log_marginal_likelihood, "make_posterior": flaplace.make_posterior,
    }  # fmt: skip


@pytest.mark.parametrize("name", DOCTESTED)
def test_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    namespace = {"torch": torch, "load_task": load_task, "results": RESULTS}
    if not name.startswith("flaplace.app"):
        namespace.update(tiny_namespace())
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
