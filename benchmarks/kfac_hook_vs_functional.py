"""K-FAC with hooks against flaplace's hook-free functional K-FAC, on Llama-architecture PEFT models.

Methods, all on the same model and batch (LoRA r=8 on q_proj/v_proj, 2 layers, batch 8 x 128
tokens, output = last-token logits of 4 answer tokens):

* ``bayesian-lora``: bayesian-lora 0.0.6's ``calculate_kronecker_factors`` called as its README and
  example do (``n_kfac=10``, ``lr_threshold=100``, ``["lora"]``). Its own conventions: one Monte
  Carlo sample of a *mean*-reduced loss, the last position only, factors averaged over batches.
* ``hooks``: a plain hook-based K-FAC written here: forward hooks on the LoRA ``nn.Linear`` modules
  keep their inputs and outputs, ``torch.autograd.grad`` pulls each Fisher cotangent back to the
  outputs (one backward per cotangent), dense factors with flaplace's normalisation.
* ``hooks-trimmed``: the same, with the model asked for the last position's logits only
  (``logits_to_keep``) and for no key/value cache (``use_cache=False``), as flaplace's
  ``ModelFunction`` does: the same work as ``flaplace`` but for
  the shared input factors, so ``flaplace / hooks-trimmed`` isolates the capture's own cost (``mc``).
* ``flaplace``: ``flaplace.build(...)`` then ``update``, eager and ``torch.compile``-d; dense
  factors (``lr_threshold=None``) like ``hooks``. ``flaplace-lowrank`` uses flaplace's low-rank
  defaults (``n_kfac=10``, ``lr_threshold=100``), the setting bayesian-lora runs with.
* ``forward+backward``: ``loss.backward()`` on the LoRA weights, the baseline of the target
  "mc with one sample at most 1.3 x forward+backward"; with ``logits_to_keep`` and no cache like
  flaplace, so the baseline is the cheapest plain step, not one that projects every position.

For the small config (hidden 256) the relative Frobenius error of every method's ``S (x) A``
against the exact GGN block of each LoRA weight (dense, from per-example ``jacrev`` Jacobians and
``Lambda = diag(p) - p p^T``, summed over the examples) is computed in float64.

Every config is measured in its own fresh worker process; the cases of a config are timed
interleaved (see ``_common.interleaved``). Run ``python benchmarks/kfac_hook_vs_functional.py``
(the full job, about 15 minutes on an idle 2-core machine) or ``--quick`` (hidden 256 only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import torch
import torch.nn.functional as F
from kfac_hook_reference import (
    LOWRANK,
    HookKFAC,
    bayesian_lora_dense,
    bayesian_lora_factors,
    logits_kwargs,
)

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = common.RESULTS / "kfac_hook_vs_functional.json"

#: name -> (hidden, timed repeats, sharings measured, compiled (fisher, sharing) pairs)
CONFIGS: dict[str, tuple[int, int, tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "h256": (256, 41, ("expand", "reduce", "last"), (("mc", "expand"),)),
    "h1024": (1024, 15, ("expand", "reduce"), ()),
    "h2048": (2048, 5, ("expand",), ()),
}
BATCH, SEQ, VOCAB, RANK = 8, 128, 1024, 8
FISHERS = ("mc", "exact")


# ------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------


def _dense_flaplace(state) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    import flaplace

    full = lambda e: e.dense()  # noqa: E731
    return {
        name.removesuffix(".weight"): (full(f.S), full(f.A))
        for name, f in flaplace.kfac_factors(state).items()
    }


def timing_worker(args) -> list[dict]:
    """Time every case of one config in this (fresh) process, or (``--worker memory``) measure peak memory."""
    import flaplace

    common.quiet()
    torch.set_num_threads(args.threads)
    hidden, repeats, sharings, compiled_pairs = CONFIGS[args.config]
    repeats = args.repeats or repeats
    if args.no_compile:
        compiled_pairs = ()
    device = args.device
    model = common.llama_lora_model(hidden, vocab=VOCAB, rank=RANK, device=device)
    batch = common.token_batch(BATCH, SEQ, vocab=VOCAB, device=device)
    params = flaplace.select_params(model, "lora")
    output_fn = flaplace.LastTokenLogits(common.ANSWER_IDS)
    model_fn = flaplace.ModelFunction(model, params, output_fn)
    lora_weights = [p for p in model.parameters() if p.requires_grad]
    cases: dict[tuple, Callable[[], object]] = {}
    extra: dict[tuple, dict] = {}

    def forward_backward():
        for p in lora_weights:
            p.grad = None
        output = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **logits_kwargs(batch, True)
        )
        logits = output_fn(output, batch)
        F.cross_entropy(logits, batch["labels"]).backward()

    cases[("forward+backward", "-", "-", False, "-")] = forward_backward
    cases[("bayesian-lora", "mc", "last", False, "low-rank")] = lambda: bayesian_lora_factors(model, batch)
    for fisher in FISHERS:
        for sharing in sharings:
            hooks = HookKFAC(
                model, output_fn, fisher=fisher, sharing=sharing, generator=torch.Generator(device)
            )
            hook_state = hooks.init()
            cases[("hooks", fisher, sharing, False, "dense")] = lambda h=hooks, s=hook_state: h.update(
                s, batch
            )
            init, update = flaplace.build(
                model_fn, fisher=fisher, sharing=sharing, lr_threshold=None, generator=torch.Generator(device)
            )
            state = init(params, batch)  # as fit does: q_proj and v_proj share one input factor
            cases[("flaplace", fisher, sharing, False, "dense")] = lambda u=update, s=state: u(
                s, params, batch
            )
    for sharing in sharings:  # the same logits work as flaplace: isolates the capture's own cost
        trimmed = HookKFAC(
            model, output_fn, fisher="mc", sharing=sharing, generator=torch.Generator(device), trim=True
        )
        trimmed_state = trimmed.init()
        cases[("hooks-trimmed", "mc", sharing, False, "dense")] = lambda h=trimmed, s=trimmed_state: h.update(
            s, batch
        )
    for sharing in ("last", "expand") if hidden <= 256 else ("last",):
        init, update = flaplace.build(model_fn, fisher="mc", sharing=sharing, **LOWRANK)
        state = init(params, batch)  # as fit does: q_proj and v_proj share one input factor
        cases[("flaplace-lowrank", "mc", sharing, False, "low-rank")] = lambda u=update, s=state: u(
            s, params, batch
        )
    for fisher, sharing in compiled_pairs if args.worker == "timing" else ():  # memory: eager cases only
        # No torch.Generator here: with one, compilation fails ("Cannot access storage of TensorWrapper").
        init, update = flaplace.build(model_fn, fisher=fisher, sharing=sharing, lr_threshold=None)
        state = init(params, batch)  # as fit does: q_proj and v_proj share one input factor
        key = ("flaplace", fisher, sharing, True, "dense")
        compiled, info = _compile(update, state, params, batch, args.backend, device)
        extra[key] = info
        if compiled is not None:
            cases[key] = lambda c=compiled, s=state: c(s, params, batch)
            if (
                fisher == "exact" and args.worker == "timing"
            ):  # deterministic: compiled and eager factors must agree
                eager = _dense_flaplace(update(state, params, batch))
                fast = _dense_flaplace(compiled(state, params, batch))
                info["compiled_vs_eager"] = max(
                    float((eager[n][i] - fast[n][i]).norm() / eager[n][i].norm())
                    for n in eager
                    for i in (0, 1)
                )
    if args.worker == "memory":
        forward_backward()  # one-time allocations (thread pools, kernels) before anything is measured
        peaks = common.peak_memory(cases, device=device)
        return [{"key": list(key), "peak_mb": peak} for key, peak in peaks.items()]
    common.log(f"{args.config}: timing {len(cases)} cases, {repeats} interleaved rounds after a warm-up")
    measured = common.interleaved(
        cases, repeats=repeats, warmup=1, device=device, log=lambda m: common.log(f"{args.config}: {m}")
    )
    env = common.environment(device)
    records = []
    for key, result in measured.items():
        method, fisher, sharing, compiled, factors = key
        records.append(
            {
                "config": args.config,
                "hidden": hidden,
                "batch": BATCH,
                "seq": SEQ,
                "method": method,
                "fisher": fisher,
                "sharing": sharing,
                "compiled": compiled,
                "factors": factors,
                "median_s": result["median_s"],
                "peak_mb": result["peak_mb"],
                "rel_err": None,
                "repeats": repeats,
                "times": result["times"],
                **extra.get(key, {}),
                "device": env["device"],
                "torch": env["torch"],
                "threads": env["threads"],
                "flaplace": env.get("flaplace"),
            }
        )
    for key, info in extra.items():
        if key not in measured:  # compilation failed: keep the record of why
            method, fisher, sharing, compiled, factors = key
            records.append(
                {
                    "config": args.config,
                    "hidden": hidden,
                    "method": method,
                    "fisher": fisher,
                    "sharing": sharing,
                    "compiled": compiled,
                    "factors": factors,
                    "median_s": None,
                    "peak_mb": None,
                    "rel_err": None,
                    **info,
                }
            )
    return records


def _compile(update, state, params, batch, backend: str, device: str):
    """``torch.compile(update)`` and its first call; falls back to ``aot_eager`` if ``backend`` fails."""
    from torch._dynamo.utils import counters

    for name in dict.fromkeys([backend, "aot_eager"]):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(update, backend=name)
        start = time.perf_counter()
        try:
            compiled(state, params, batch)
        except Exception as error:  # noqa: BLE001 - record why and try the next backend
            common.log(f"torch.compile with backend {name!r} failed: {type(error).__name__}: {error}")
            continue
        common.sync(device)
        breaks = sum(counters["graph_break"].values())
        return compiled, {"backend": name, "compile_s": time.perf_counter() - start, "graph_breaks": breaks}
    return None, {"backend": backend, "error": "torch.compile failed with every backend tried"}


def block_rel_errors(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], ggn: dict[str, torch.Tensor], scale: float = 1.0
) -> list[float]:
    """``||scale * S (x) A - H||_F / ||H||_F`` for every block."""
    return [
        float((scale * torch.kron(factors[n][0], factors[n][1]) - H).norm() / H.norm())
        for n, H in ggn.items()
    ]


def exact_ggn_blocks(model, params: dict, batch: dict) -> dict[str, torch.Tensor]:
    """``sum_n J_n^T (diag p_n - p_n p_n^T) J_n`` per LoRA weight, from per-example ``jacrev`` Jacobians."""
    from torch.func import functional_call, jacrev, vmap

    ids = batch["input_ids"]

    def logits_of_one(p, one_ids):
        logits = functional_call(model, p, (one_ids[None],)).logits
        return logits[0, -1, list(common.ANSWER_IDS)]

    jac = vmap(jacrev(logits_of_one), in_dims=(None, 0))(params, ids)  # name -> (B, C, o, i)
    with torch.no_grad():
        probs = vmap(logits_of_one, in_dims=(None, 0))(params, ids).softmax(-1)
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    out = {}
    for name, J in jac.items():
        flat = J.flatten(2)  # (B, C, o*i), row-major vec(W)
        out[name.removesuffix(".weight")] = torch.einsum("bcp,bcd,bdq->pq", flat, lam, flat)
    return out


def accuracy_worker(args) -> list[dict]:
    """Relative Frobenius errors of every method's ``S (x) A`` against the exact GGN, float64, hidden 256."""
    import flaplace

    common.quiet()
    torch.set_num_threads(args.threads)
    hidden = CONFIGS["h256"][0]
    # Eager attention: the per-example Jacobians vmap over the model, which sdpa's CPU kernels do not batch.
    model = common.llama_lora_model(
        hidden, vocab=VOCAB, rank=RANK, dtype=torch.float64, attn_implementation="eager"
    )
    batch = common.token_batch(BATCH, SEQ, vocab=VOCAB)
    params = flaplace.select_params(model, "lora")
    output_fn = flaplace.LastTokenLogits(common.ANSWER_IDS)
    model_fn = flaplace.ModelFunction(model, params, output_fn)
    start = time.perf_counter()
    ggn = exact_ggn_blocks(model, params, batch)
    common.log(
        f"exact GGN blocks ({len(ggn)} of side {next(iter(ggn.values())).shape[0]}) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    records = []

    def record(method, fisher, sharing, factors_kind, errors, **more):
        records.append(
            {
                "config": "h256",
                "method": method,
                "fisher": fisher,
                "sharing": sharing,
                "factors": factors_kind,
                "rel_err": statistics.fmean(errors),
                "rel_err_max": max(errors),
                **more,
            }
        )

    for fisher in FISHERS:
        for sharing in CONFIGS["h256"][2]:
            hooks = HookKFAC(
                model, output_fn, fisher=fisher, sharing=sharing, generator=torch.Generator().manual_seed(0)
            )
            hook_factors = HookKFAC.factors(hooks.update(hooks.init(), batch))
            record("hooks", fisher, sharing, "dense", block_rel_errors(hook_factors, ggn))
            init, update = flaplace.build(
                model_fn,
                fisher=fisher,
                sharing=sharing,
                lr_threshold=None,
                generator=torch.Generator().manual_seed(0),
            )
            ours = _dense_flaplace(update(init(params, batch), params, batch))
            vs_hooks = max(
                float(
                    (torch.kron(*ours[n]) - torch.kron(*hook_factors[n])).norm()
                    / torch.kron(*hook_factors[n]).norm()
                )
                for n in ours
            )
            record(
                "flaplace",
                fisher,
                sharing,
                "dense",
                block_rel_errors(ours, ggn),
                rel_diff_vs_hooks=vs_hooks if fisher == "exact" else None,
            )
    for sharing in ("last", "expand"):
        init, update = flaplace.build(
            model_fn, fisher="mc", sharing=sharing, generator=torch.Generator().manual_seed(0), **LOWRANK
        )
        record(
            "flaplace-lowrank",
            "mc",
            sharing,
            "low-rank",
            block_rel_errors(_dense_flaplace(update(init(params, batch), params, batch)), ggn),
        )
    torch.manual_seed(0)
    theirs = bayesian_lora_dense(bayesian_lora_factors(model, batch))
    # bayesian-lora: A sums a a^T over the batch and S sums (g/B)(g/B)^T (mean-reduced loss), so
    # S (x) A is the summed-loss block divided by the number of examples B; times B it is comparable.
    record(
        "bayesian-lora",
        "mc",
        "last",
        "low-rank",
        block_rel_errors(theirs, ggn),
        rel_err_rescaled=statistics.fmean(block_rel_errors(theirs, ggn, scale=BATCH)),
        rel_err_rescaled_max=max(block_rel_errors(theirs, ggn, scale=BATCH)),
        rescale=BATCH,
    )
    return records


# ------------------------------------------------------------------------------------------------
# Orchestration, targets, docs
# ------------------------------------------------------------------------------------------------


def merge_accuracy(records: list[dict], accuracy: list[dict]) -> None:
    by_key = {(a["method"], a["fisher"], a["sharing"], a["factors"]): a for a in accuracy}
    for r in records:
        if r["config"] != "h256":
            continue
        a = by_key.get((r["method"], r["fisher"], r["sharing"], r["factors"]))
        if a is None:
            continue
        if r["compiled"] and not (r.get("compiled_vs_eager") is not None and r["compiled_vs_eager"] < 1e-4):
            continue  # the compiled factors are only known to equal the eager ones for exact
        for field in (
            "rel_err",
            "rel_err_max",
            "rel_err_rescaled",
            "rel_err_rescaled_max",
            "rescale",
            "rel_diff_vs_hooks",
        ):
            if a.get(field) is not None:
                r[field] = a[field]


def check_targets(records: list[dict]) -> list[dict]:
    """The issue's targets, as ratios of medians within one config's (interleaved) run.

    Each entry also carries the median and quartiles of the per-round ratios (both cases are
    timed in the same round), which show how much of a ratio is noise.
    """
    by_key = {
        (r["config"], r["method"], r["fisher"], r["sharing"], r["compiled"]): r
        for r in records
        if r.get("median_s") is not None
    }
    out = []

    def compare(config: str, ours: tuple, theirs: tuple, target: str, limit: float | None) -> None:
        a, b = by_key.get((config, *ours)), by_key.get((config, *theirs))
        if not (a and b):
            return
        ratio = a["median_s"] / b["median_s"]
        entry = {
            "config": config,
            "target": target,
            "ratio": ratio,
            "limit": limit,
            "met": None if limit is None else ratio <= limit,
        }
        ta, tb = a.get("times") or [], b.get("times") or []
        if len(ta) == len(tb) >= 2:
            rounds = [x / y for x, y in zip(ta, tb, strict=True)]
            q1, _, q3 = statistics.quantiles(rounds, n=4)
            entry |= {"paired_median": statistics.median(rounds), "paired_iqr": [q1, q3]}
        out.append(entry)

    for config in sorted({r["config"] for r in records}, key=lambda c: CONFIGS[c][0]):
        sharings = CONFIGS[config][2]
        for fisher in FISHERS:
            for sharing in sharings:
                compare(
                    config,
                    ("flaplace", fisher, sharing, False),
                    ("hooks", fisher, sharing, False),
                    f"flaplace eager <= hooks ({fisher}, {sharing})",
                    1.0,
                )
        for sharing in sharings:
            compare(
                config,
                ("flaplace", "mc", sharing, False),
                ("hooks-trimmed", "mc", sharing, False),
                f"flaplace eager <= hooks-trimmed (mc, {sharing})",
                1.0,
            )
        for sharing in sharings:
            compare(
                config,
                ("flaplace", "mc", sharing, False),
                ("forward+backward", "-", "-", False),
                f"flaplace mc (1 sample, {sharing}) <= 1.3 x forward+backward",
                1.3,
            )
    return out


def docs_markdown(records: list[dict], targets: list[dict]) -> str:
    env = next((r for r in records if r.get("torch")), {})
    diffs = [r["rel_diff_vs_hooks"] for r in records if r.get("rel_diff_vs_hooks") is not None]
    vs_hooks = f"{max(diffs):.1e}" if diffs else "not measured"
    lines = [
        "## K-FAC: hooks against flaplace",
        "",
        f"Measured by `benchmarks/kfac_hook_vs_functional.py` (torch {env.get('torch', '?')}, "
        f"{env.get('device', 'cpu')}, threads: {env.get('threads', '?')}). Llama architecture, 2 layers, "
        f"vocabulary {VOCAB}, intermediate size 2.6875 x hidden, one head per 64 features, PEFT LoRA "
        f"r={RANK} on `q_proj` and `v_proj`; batch {BATCH} x {SEQ} tokens; output: last-token logits "
        f"of {len(common.ANSWER_IDS)} answer tokens. Times are medians over interleaved repeats after a "
        "warm-up (see above); `x fwd+bwd` divides by the plain forward+backward of the same run (which "
        "asks for the last position's logits only and for no key/value cache, like flaplace). "
        "Peak memory is the resident-set rise of one call, measured in a separate process; it was not "
        "measured for compiled cases (`-`). `hooks` and `flaplace` keep dense factors; `low-rank` "
        f"factors keep the top {LOWRANK['n_kfac']} eigenpairs of every factor of side >= "
        f"{LOWRANK['lr_threshold']}.",
        "",
        "`rel_err`: mean (max) over the 8 LoRA blocks of `||S (x) A - H||_F / ||H||_F`, with `H` the exact "
        "GGN block (dense, from per-example `jacrev` Jacobians, `Lambda = diag(p) - p p^T`, summed over "
        "the same batch of 8 x 128 tokens), float64, hidden 256 only. The errors are large for every "
        "method: with 8 examples, a Kronecker product of sums is far from the sum of the per-example "
        "Kronecker products, and `mc` adds the noise of one sample. The factors of `flaplace` and "
        f"`hooks` are the same (exact Fisher: largest relative difference {vs_hooks}). bayesian-lora "
        "averages a mean-reduced loss, so its `S (x) A` is the summed-loss block divided by the batch "
        "size; `x8` gives its error after multiplying by 8 (raw error first). With that scaling its "
        "rescaled `S (x) A` equals flaplace's `mc`/`last` block for the same sampled labels (identical errors).",
        "",
        "Where the time differences come from. Both `hooks` and `flaplace` run one forward and one "
        "backward per Fisher cotangent. flaplace does less work in three places. (1) The `exact` type of "
        "a categorical likelihood pulls back `C - 1` cotangents "
        f"instead of `C` (here {len(common.ANSWER_IDS) - 1} instead of {len(common.ANSWER_IDS)}): "
        "`diag(p) - p p^T` has rank `C - 1`, and a Householder root gives the same matrix (docs/kfac.md); "
        "the hook reference keeps the textbook `C` columns. (2) `q_proj` and `v_proj` read the same hidden "
        "states, so their `lora_A` input factors are one product, computed once (flaplace sees the same "
        "input object; the hook reference computes it twice). The states are built with "
        "`init(params, batch)`, as `fit` does (the runs up to the one at commit 0f7cbd9 called "
        "`init(params)`, which shares nothing). (3) `ModelFunction` asks the model for the "
        "last position's logits only (Hugging Face's `logits_to_keep`) and for no key/value cache "
        "(`use_cache=False`), where `hooks` projects all 128 positions onto the vocabulary and builds "
        "the cache, as bayesian-lora's example does. `hooks-trimmed` does (3) too, so "
        "`flaplace / hooks-trimmed` is the cost of the capture mechanism itself, less the shared input "
        "factor (2). A hook implementation could adopt all three; the comparison shows "
        "what the library does, not a limit of hooks.",
        "",
    ]
    for config in sorted({r["config"] for r in records}, key=lambda c: CONFIGS[c][0]):
        rows = [r for r in records if r["config"] == config]
        base = next((r["median_s"] for r in rows if r["method"] == "forward+backward"), None)
        version = next((r.get("flaplace") for r in rows if r.get("flaplace")), None)
        lines += [f"### hidden {CONFIGS[config][0]}", ""]
        if version:
            lines += [f"flaplace at commit `{version}`.", ""]
        table = []
        for r in rows:
            err = r.get("rel_err")
            err_text = "-" if err is None else f"{err:.3g} ({r.get('rel_err_max', float('nan')):.3g})"
            if r.get("rel_err_rescaled") is not None:
                err_text += (
                    f"; x{r['rescale']}: {r['rel_err_rescaled']:.3g} ({r['rel_err_rescaled_max']:.3g})"
                )
            compiled = r["compiled"]
            if compiled:
                compiled = (
                    f"{r.get('backend', '?')} (compile {r['compile_s']:.0f} s)"
                    if r.get("compile_s")
                    else "failed"
                )
            table.append(
                [
                    r["method"],
                    r["fisher"],
                    r["sharing"],
                    r["factors"],
                    common.fmt(compiled),
                    common.fmt(r["median_s"]),
                    common.fmt(r["median_s"] / base if (base and r["median_s"]) else None),
                    common.fmt(r["peak_mb"], ".0f"),
                    err_text,
                ]
            )
        lines.append(
            common.markdown_table(
                [
                    "method",
                    "fisher",
                    "sharing",
                    "factors",
                    "compiled",
                    "median s",
                    "x fwd+bwd",
                    "peak MB",
                    "rel_err mean (max)",
                ],
                table,
            )
        )
        lines.append("")
    lines += [
        "### Targets",
        "",
        "`ratio` divides the two medians, as the targets ask. Single calls vary by 10 to 20 % on this "
        "shared machine, so the table also gives the ratio of the two cases within each round (they "
        "run back to back) as median and quartiles over the rounds: a ratio whose quartiles straddle "
        "1 is a tie within the noise, whatever the ratio of medians says.",
        "",
        common.markdown_table(
            ["config", "target", "ratio", "paired: median [quartiles]", "limit", "met"],
            [
                [
                    t["config"],
                    t["target"],
                    f"{t['ratio']:.2f}",
                    (
                        f"{t['paired_median']:.2f} [{t['paired_iqr'][0]:.2f}, {t['paired_iqr'][1]:.2f}]"
                        if "paired_median" in t
                        else "-"
                    ),
                    "-" if t["limit"] is None else f"{t['limit']:.1f}",
                    "-" if t["met"] is None else "yes" if t["met"] else "**no**",
                ]
                for t in targets
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per case (default: per config)"
    )
    parser.add_argument("--quick", action="store_true", help="hidden 256 only, 3 repeats, no docs update")
    parser.add_argument("--output", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUTPUT})")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile-d cases")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager as fallback)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust to other jobs on the machine)"
    )
    parser.add_argument("--no-accuracy", action="store_true", help="skip the float64 GGN comparison")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds per worker process")
    parser.add_argument(
        "--docs-only", action="store_true", help="rewrite the docs section from the results JSON, run nothing"
    )
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["timing", "memory", "accuracy"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        records = accuracy_worker(args) if args.worker == "accuracy" else timing_worker(args)
        common.write_worker_output(args.worker_output, records)
        return 0

    if args.docs_only:
        records = json.loads((args.output or DEFAULT_OUTPUT).read_text())
        common.update_docs_section("kfac", docs_markdown(records, check_targets(records)))
        return 0
    configs = ["h256"] if args.quick else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    repeats = args.repeats or (3 if args.quick else None)
    output = args.output or (
        Path("/tmp/kfac_hook_vs_functional.quick.json") if args.quick else DEFAULT_OUTPUT
    )
    started = time.perf_counter()
    accuracy: list[dict] = []
    if "h256" in configs and not args.no_accuracy:
        common.log("accuracy against the exact GGN (float64, hidden 256)")
        accuracy, error = common.run_worker(SCRIPT, ["--worker", "accuracy"], timeout=args.timeout)
        if error:
            common.log(f"accuracy worker: {error}")
    records: list[dict] = []
    for config in configs:
        common.log(f"timing {config}")
        worker_args = [
            "--worker",
            "timing",
            "--config",
            config,
            "--backend",
            args.backend,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        if repeats:
            worker_args += ["--repeats", str(repeats)]
        if args.no_compile:
            worker_args.append("--no-compile")
        got, error = common.run_worker(SCRIPT, worker_args, timeout=args.timeout)
        if not error and not args.device.startswith("cuda"):
            common.log(f"memory {config}")
            memory_args = [a if a != "timing" else "memory" for a in worker_args]
            peaks, memory_error = common.run_worker(
                SCRIPT, memory_args, timeout=args.timeout, env=common.MEMORY_ENV
            )
            by_key = {tuple(p["key"]): p["peak_mb"] for p in peaks}
            for r in got:
                r["peak_mb"] = by_key.get(
                    (r["method"], r["fisher"], r["sharing"], r["compiled"], r["factors"])
                )
            if memory_error:
                common.log(f"memory {config}: {memory_error}")
        if error:
            common.log(f"{config}: {error}")
            records.append(
                {
                    "config": config,
                    "method": "all",
                    "fisher": "-",
                    "sharing": "-",
                    "compiled": False,
                    "median_s": None,
                    "peak_mb": None,
                    "rel_err": None,
                    "error": error,
                }
            )
        records += got
    if output == DEFAULT_OUTPUT and output.exists() and set(configs) != set(CONFIGS):
        kept = [r for r in json.loads(output.read_text()) if r["config"] not in configs]
        common.log(f"keeping {len(kept)} records of other configs from {output}")
        records = kept + records
    merge_accuracy(records, accuracy)
    targets = check_targets(records)
    common.write_results(output, records)
    common.log(f"wrote {output} ({len(records)} records) in {(time.perf_counter() - started) / 60:.1f} min")
    for t in targets:
        common.log(
            f"{t['config']}: {t['target']}: ratio {t['ratio']:.2f}"
            + ("" if t["met"] is None else f" -> {'met' if t['met'] else 'NOT met'}")
        )
    if output == DEFAULT_OUTPUT:
        common.update_docs_section("kfac", docs_markdown(records, targets))
        common.log(f"updated {common.DOCS_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
