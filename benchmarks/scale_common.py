"""Helpers of scale.py: compiling a case, merging runs, the flaplace/peer ratios, the done-when check, the docs tables."""

from __future__ import annotations

import time
from collections.abc import Callable

import _common as common
import torch

STAGES = ("forward_backward", "kfac_lowrank", "kfac_dense", "evidence", "prior_tuning", "predictive")


def compile_case(fn: Callable, example: tuple, backend: str, device: str) -> tuple[Callable | None, dict]:
    """``torch.compile(fn)`` and its first call (timed); falls back to ``aot_eager`` if ``backend`` fails."""
    from torch._dynamo.utils import counters

    for name in dict.fromkeys([backend, "aot_eager"]):
        counters.clear()
        compiled = torch.compile(fn, backend=name)
        start = time.perf_counter()
        try:
            compiled(*example)
        except Exception as error:  # noqa: BLE001 - record why and try the next backend
            common.log(f"torch.compile with backend {name!r} failed: {type(error).__name__}: {error}")
            continue
        common.sync(device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        compiled(*example)  # the second call must not recompile
        common.sync(device)
        return compiled, {
            "backend": name,
            "compile_s": first,
            "second_call_s": time.perf_counter() - start,
            "graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],  # 1: the second call reused the graph
        }
    return None, {"backend": backend, "error": "torch.compile failed with every backend tried"}


# ------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the records that ``new`` re-measured (same config, device and stage), then ``new``.

    A run's ``forward_backward`` record stays beside those of other runs (``x fwd+bwd`` divides by the
    yardstick of the same run).
    """
    redone = {(r["config"], r.get("device"), r["stage"], r.get("run")) for r in new}
    stages = {(c, d, s) for c, d, s, _ in redone if s != "forward_backward"}
    kept = [
        r
        for r in old
        if (r["config"], r.get("device"), r["stage"]) not in stages
        and (r["config"], r.get("device"), r["stage"], r.get("run")) not in redone
    ]
    return kept + new


# ------------------------------------------------------------------------------------------------
# Ratios and docs
# ------------------------------------------------------------------------------------------------


def ratios(records: list[dict]) -> list[dict]:
    """flaplace / peer ratios of time and peak memory, per config and stage, from the same run."""
    ok = [r for r in records if r.get("median_s") is not None]
    out = []
    for config in dict.fromkeys(r["config"] for r in ok):
        rows = [r for r in ok if r["config"] == config]
        for stage in STAGES:
            ours = [r for r in rows if r["stage"] == stage and r["method"] == "flaplace"]
            theirs = [
                r for r in rows if r["stage"] == stage and r["method"] in ("bayesian-lora", "laplace-torch")
            ]
            for a in ours:
                for b in theirs:
                    entry = {
                        "config": config,
                        "device": a.get("device"),
                        "stage": stage,
                        "flaplace": f"{a['variant']}{' compiled' if a['compiled'] else ''}",
                        "peer": f"{b['method']} {b['variant']}",
                        "time_ratio": a["median_s"] / b["median_s"],
                        "memory_ratio": (
                            a["peak_mb"] / b["peak_mb"]
                            if min(a.get("peak_mb") or 0, b.get("peak_mb") or 0) >= 1  # 1 MB: resolution
                            else None
                        ),
                    }
                    ta, tb = a.get("times") or [], b.get("times") or []
                    if len(ta) == len(tb) >= 1:
                        rounds = sorted(x / y for x, y in zip(ta, tb, strict=True))
                        entry["paired_range"] = [rounds[0], rounds[-1]]
                    out.append(entry)
    return out


def done_when(records: list[dict]) -> list[dict]:
    """The issue's target: flaplace low-rank K-FAC (eager) <= bayesian-lora (README) in time and memory."""
    out = []
    for t in ratios(records):
        if (
            t["stage"] == "kfac_lowrank"
            and t["flaplace"] == "mc/last/lowrank"
            and t["peer"] == "bayesian-lora mc/last/lowrank"
        ):
            met = t["time_ratio"] <= 1.0 and (t["memory_ratio"] is None or t["memory_ratio"] <= 1.0)
            out.append({**t, "met": met})
    return out


def docs_markdown(records: list[dict]) -> str:
    env = next((r for r in records if r.get("torch")), {})
    lines = [
        "## Scale: Llama-7B-shaped layers",
        "",
        "Measured by `benchmarks/scale.py` (see its docstring). A random `LlamaForCausalLM` with Llama-7B's "
        "layer shapes (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000) and 2 decoder layers; "
        "base weights in bfloat16, PEFT LoRA r=8 (alpha 16) in float32 on `q_proj`/`v_proj` (`qv`) or on all "
        "seven linear layers of each block (`all`); output: last-position logits of 4 answer tokens. "
        f"torch {env.get('torch', '?')}, device {env.get('device', '?')}, {env.get('threads', '?')} torch "
        "thread(s). Times are medians over interleaved rounds (all cases of a config "
        "in one process, a new random order each round, after one untimed call of every case whose code the "
        "setup had not run yet); `x fwd+bwd` divides by the plain forward+backward of "
        "the same run. Peak memory (CPU) is the resident-set rise of one call in a separate worker "
        "process (see above), after one untimed call of each case.",
        "",
    ]
    for config in dict.fromkeys(r["config"] for r in records):
        rows = [r for r in records if r["config"] == config]
        first = rows[0]
        bases = {
            r.get("run"): r["median_s"] for r in rows if r["stage"] == "forward_backward" and r["median_s"]
        }
        setup = next((r.get("setup") for r in rows if r.get("setup")), {}) or {}
        load = next((r.get("loadavg") for r in rows if r.get("loadavg")), None)
        lines += [f"### {config}", ""]
        if "hidden" in first:
            text = (
                f"hidden {first['hidden']}, LoRA on `{first['lora']}`, batch {first['batch']} x {first['seq']} tokens, "
                f"{first.get('repeats', '?')} timed rounds, device {first.get('device')}"
                + (f" ({first['gpu']})" if first.get("gpu") else "")
                + f", flaplace at `{first.get('flaplace')}`."
            )
            if load:
                text += f" Load average (1 min) {load[0][0]:.1f} before, {load[1][0]:.1f} after the timing."
            if setup:
                text += (
                    " Setup (once): "
                    + ", ".join(
                        f"{k.removesuffix('_s')} {v:.1f} s" for k, v in setup.items() if isinstance(v, float)
                    )
                    + "."
                )
            lines += [text, ""]
        table = []
        for r in sorted(rows, key=lambda r: STAGES.index(r["stage"]) if r["stage"] in STAGES else 99):
            base = bases.get(r.get("run"))
            compiled = r["compiled"]
            if compiled:
                compiled = (
                    f"{r.get('backend', '?')} (first call {r['compile_s']:.0f} s)"
                    if r.get("compile_s")
                    else "failed"
                )
            table.append(
                [
                    r.get("run") or "-",
                    r["stage"],
                    r["method"],
                    r.get("variant", "-"),
                    common.fmt(compiled),
                    common.fmt(r["median_s"]),
                    common.fmt(r["median_s"] / base if (base and r["median_s"]) else None),
                    common.fmt(r["peak_mb"], ".0f"),
                    (r.get("error") or "")[:80],
                ]
            )
        lines.append(
            common.markdown_table(
                [
                    "run",
                    "stage",
                    "method",
                    "variant",
                    "compiled",
                    "median s",
                    "x fwd+bwd",
                    "peak MB",
                    "error",
                ],
                table,
            )
        )
        lines.append("")
    lines += [
        "### Ratios (flaplace / peer, same run)",
        "",
        "`paired range`: the smallest and largest ratio of the two calls within one round.",
        "",
        common.markdown_table(
            ["config", "stage", "flaplace", "peer", "time ratio", "paired range", "memory ratio"],
            [
                [
                    t["config"],
                    t["stage"],
                    t["flaplace"],
                    t["peer"],
                    f"{t['time_ratio']:.2f}",
                    f"{t['paired_range'][0]:.2f}-{t['paired_range'][1]:.2f}" if "paired_range" in t else "-",
                    "-" if t["memory_ratio"] is None else f"{t['memory_ratio']:.2f}",
                ]
                for t in ratios(records)
            ],
        ),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
