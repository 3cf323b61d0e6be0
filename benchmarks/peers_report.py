"""Figures and Markdown tables of benchmarks/results/compare_peers.json for docs/peers.md."""

from __future__ import annotations

from typing import Any

import torch
from peers_common import IMAGES  # first: puts flaplace and tests/ on sys.path
from torch import Tensor


def _reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    confidence, prediction = probs.double().max(-1)
    correct = (prediction == labels).double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(confidence))
    conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    safe = count.clamp_min(1)
    return {"count": count.tolist(), "confidence": (conf / safe).tolist(), "accuracy": (acc / safe).tolist()}


def _reliability_png(name: str, probs: dict[str, Tensor], labels: Tensor, n_test: int) -> None:
    from flaplace.app.plots import reliability_diagram

    IMAGES.mkdir(parents=True, exist_ok=True)
    reliability_diagram(
        {k.replace(" KronLaplace", ""): v.double() for k, v in probs.items()},
        labels,
        IMAGES / f"peers_reliability_{name}.png",
        title=f"{name}: MiniLM + LoRA, {n_test} test examples",
    )


def make_plots(results: dict[str, Any]) -> None:
    """Redraw docs/img/peers_time.png (time against hidden size, one panel per stage)."""
    records = [r for r in results.get("cost", {}).get("records", []) if r.get("median_s") is not None]
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("kfac_fit", "evidence", "prior_tuning", "predictive")
    fig, grid = plt.subplots(2, 2, figsize=(11, 9))
    axes = grid.ravel()
    colours = {"flaplace": "tab:blue", "laplace-torch": "tab:orange", "bayesian-lora": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for ax, stage in zip(axes, stages, strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            if r["stage"] != stage:
                continue
            key = f"{r['library']} {r['backend']}{' (compiled)' if r['compiled'] else ''}"
            lines.setdefault(key, []).append((int(r["config"].removeprefix("hidden")), r["median_s"]))
        per_library: dict[str, int] = {}
        for key, points in sorted(lines.items()):
            library = key.split(" ")[0]
            style = styles[per_library.get(library, 0) % len(styles)]
            per_library[library] = per_library.get(library, 0) + 1
            points.sort()
            ax.plot(*zip(*points, strict=True), style, marker="o", color=colours[library], label=key, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([256, 1024, 2048], ["256", "1024", "2048"])
        ax.set_xlabel("hidden size")
        ax.set_ylabel("median time (s)")
        ax.set_title(stage, fontsize=12)
        ax.grid(True, alpha=0.3)
    # one legend for all panels, below them, so that no line is covered
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "peers_time.png", dpi=100)
    plt.close(fig)


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def markdown_tables(results: dict[str, Any]) -> str:
    """The tables of docs/peers.md, from the results JSON."""
    out: list[str] = []
    if "agreement" in results:
        a = results["agreement"]
        out += [
            "### Agreement (largest relative difference)",
            "",
            "| quantity | max relative difference |",
            "|---|---|",
        ]
        out += [f"| {k} | {_fmt(v, '.1e')} |" for k, v in a["max_rel"].items()]
        t = a["prior_tuning"]
        out += [
            "",
            "| evidence-tuned prior precision | value | d log Z / d log lambda |",
            "|---|---|---|",
            f"| flaplace ({t['flaplace_steps']} steps, to tolerance) | {t['flaplace']:.6g} | "
            f"{t['dlogZ_dloglambda_flaplace']:.1e} |",
            f"| laplace-torch, 100 Adam steps (its default) | {t['laplace_torch_100_steps']:.6g} | "
            f"{t['dlogZ_dloglambda_laplace_torch_100_steps']:.1e} |",
            f"| laplace-torch, 2000 Adam steps | {t['laplace_torch_2000_steps']:.6g} | "
            f"{t['dlogZ_dloglambda_laplace_torch_2000_steps']:.1e} |",
            "",
        ]
    if "cost" in results:
        out += ["### Cost (median seconds / peak MiB)", ""]
        records = results["cost"]["records"]
        configs = sorted({r["config"] for r in records}, key=lambda c: int(c.removeprefix("hidden")))
        out += ["| stage | library | backend / variant | compiled | " + " | ".join(configs) + " |"]
        out += ["|---|---|---|---|" + "---|" * len(configs)]
        keys = []
        for r in records:
            key = (r["stage"], r["library"], r["backend"], r["compiled"])
            if key not in keys:
                keys.append(key)
        order = {"kfac_fit": 0, "evidence": 1, "prior_tuning": 2, "predictive": 3}
        keys.sort(key=lambda k: order[k[0]])
        for key in keys:
            cells = []
            for config in configs:
                match = [
                    r
                    for r in records
                    if (r["stage"], r["library"], r["backend"], r["compiled"]) == key
                    and r["config"] == config
                ]
                if not match:
                    cells.append("")
                elif match[0].get("error"):
                    cells.append("fails")
                else:
                    cells.append(f"{match[0]['median_s']:.3g} s / {match[0]['peak_mb']:.0f}")
            out.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {'yes' if key[3] else ''} | " + " | ".join(cells) + " |"
            )
        out.append("")
    if "quality" in results:
        for name, task in results["quality"]["tasks"].items():
            n = task["n_examples"]
            out += [f"#### {name} ({n['train']} train / {n['test']} test, {task['n_classes']} classes)", ""]
            out += ["| method | accuracy | NLL | ECE | Brier | prior |", "|---|---|---|---|---|---|"]
            for method, row in task["methods"].items():
                if "error" in row:
                    out.append(f"| {method} | fails: {row['error'][:80]} | | | | |")
                    continue
                m = row["metrics"]
                prior = row.get("prior_precision", row.get("prior_variance"))
                prior_text = (
                    ""
                    if prior is None
                    else (f"s2={prior:.3g}" if "prior_variance" in row else f"λ={prior:.3g}")
                )
                mark = " (best)" if method == task["flaplace_best"] else ""
                mark += " (evidence-selected)" if method == task["flaplace_evidence_selected"] else ""
                out.append(
                    f"| {method}{mark} | {m['accuracy']:.3f} | {m['nll']:.4f} | {m['ece']:.4f} | "
                    f"{m['brier']:.4f} | {prior_text} |"
                )
            out.append("")
            for label, comparison in task["bootstrap"].items():
                parts = [
                    f"{metric} {c['diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                    for metric, c in comparison.items()
                    if metric in ("nll", "ece")
                ]
                out.append(f"- {label}: " + "; ".join(parts))
            out.append("")
    return "\n".join(out)
