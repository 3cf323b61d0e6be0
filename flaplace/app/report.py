"""The outputs of a run: ``results.json``, the reliability diagram, the tables it prints.

Examples:
    >>> results = {"config": {"link": "probit"}, "metrics": {
    ...     "map": {"accuracy": 0.9, "nll": 0.3, "ece": 0.05, "brier": 0.15},
    ...     "laplace": {"accuracy": 0.9, "nll": 0.25, "ece": 0.02, "brier": 0.14}}}
    >>> print(format_table(results))
    method      accuracy      NLL      ECE    Brier
    MAP           0.9000   0.3000   0.0500   0.1500
    Laplace       0.9000   0.2500   0.0200   0.1400
"""

from __future__ import annotations

import platform
from typing import Any

import torch

import flaplace

#: The files of a finished run; deleted when a run starts; the diagram is optional and written last.
FINAL_OUTPUTS: tuple[str, ...] = ("results.json", "reliability.png", "posterior.safetensors")


def versions() -> dict[str, str]:
    """Versions of the software a run used.

    Examples:
        >>> sorted(versions())[:3]
        ['flaplace', 'peft', 'python']
    """
    out = {"python": platform.python_version(), "flaplace": flaplace.__version__, "torch": torch.__version__}
    for module in ("transformers", "peft", "tokenizers"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = "not installed"
    return out


def format_table(results: dict[str, Any]) -> str:
    """The MAP vs Laplace table of a run's results, as fixed-width text.

    Examples:
        >>> print(format_table(results).splitlines()[0])
        method      accuracy      NLL      ECE    Brier
    """
    lines = [f"{'method':<10} {'accuracy':>9} {'NLL':>8} {'ECE':>8} {'Brier':>8}"]
    for label, key in (("MAP", "map"), ("Laplace", "laplace")):
        m = results["metrics"][key]
        lines.append(
            f"{label:<10} {m['accuracy']:>9.4f} {m['nll']:>8.4f} {m['ece']:>8.4f} {m['brier']:>8.4f}"
        )
    return "\n".join(lines)


def format_markdown(results: dict[str, Any]) -> str:
    """The MAP vs Laplace table as a Markdown table (for docs).

    Examples:
        >>> print(format_markdown(results).splitlines()[2])
        | MAP | 0.9000 | 0.3000 | 0.0500 | 0.1500 |
    """
    lines = ["| method | accuracy | NLL | ECE | Brier |", "|---|---|---|---|---|"]
    for label, key in (("MAP", "map"), (f"Laplace ({results['config']['link']})", "laplace")):
        m = results["metrics"][key]
        lines.append(
            f"| {label} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} | {m['brier']:.4f} |"
        )
    return "\n".join(lines)


def format_stages(stages: dict[str, str]) -> str:
    """One line saying which stages a run reused from its checkpoints and which it computed.

    Examples:
        >>> format_stages({"map": "loaded", "kfac": "loaded", "prior": "computed", "predictive": "computed"})
        'reused checkpoints: map, kfac; computed: prior, predictive'
    """
    reused = [s for s, how in stages.items() if how == "loaded"]
    computed = [s for s, how in stages.items() if how != "loaded"]
    return f"reused checkpoints: {', '.join(reused) or 'none'}; computed: {', '.join(computed) or 'none'}"
