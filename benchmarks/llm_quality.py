"""Laplace-LoRA on a real pretrained LLM (SmolLM2-135M-Instruct): a quality table per task.

One run = one task: LoRA (r=8, q/v) fine-tuned with answer scoring (MAP, early-stopped on the
validation NLL), then, on the same MAP weights,

* ``map``: softmax of the scores;
* ``temperature``: the scores divided by a temperature fitted on the validation NLL;
* ``flaplace``: K-FAC Laplace over every LoRA weight, prior precision by the evidence;
* ``flaplace-val``: the same posterior, prior precision by the lowest validation NLL on a grid;
* ``last_layer``: K-FAC Laplace over the LoRA weights of the last decoder block only (the model
  ties its output head to the input embeddings, so the "last layer" of a tied-embedding LM
  with cloze scoring is taken as its last adapted block), prior by the evidence;

all with the linearised predictive and the Monte Carlo link (probabilities averaged over logit
samples). ARC-Easy and OpenBookQA use cloze scoring (``ClozeModelFunction``; OpenBookQA with
``--unconditional "Answer:"``, each choice's score minus its score after "Answer:"); BoolQ scores
" yes" against " no" at the last position (``LastTokenLogits``): for one-token answers, the same
class probabilities and Laplace predictive as cloze scoring at half the cost (one shared shift).

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/llm_quality.py --task arc_easy
    PYTHONPATH=$PWD python benchmarks/llm_quality.py --task openbookqa --unconditional "Answer:" --shift arc_easy

Each run replaces its task's records in ``benchmarks/results/llm_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import flaplace  # noqa: E402
from flaplace.app import stats  # noqa: E402
from flaplace.app.models import load_causal_lm  # noqa: E402
from flaplace.jacobians import jacobians_and_logits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "llm_quality.json"


# ------------------------------------------------------------------------------------------------
# Data (read by path from the shared data folder, never copied)
import llm_peers as peers  # noqa: E402
from llm_tasks import TASKS, Scorer  # noqa: E402  (the shared data folder's readers, scoring)

# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def logits_of(model_fn, params, batches) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = torch.cat([model_fn(params, b) for b in batches])
    return logits, torch.cat([b["labels"] for b in batches])


def train_map(model_fn, live, train, val, *, epochs: int, lr: float, batch_size: int, seed: int, warmup: int):
    """AdamW on the cross-entropy of the scores; keeps the epoch with the lowest validation NLL."""
    opt = torch.optim.AdamW(live.values(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order = list(range(len(train)))
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / (epochs * steps_per_epoch))
    )
    best = (math.inf, {n: p.detach().clone() for n, p in live.items()}, 0)
    history = []
    for epoch in range(1, epochs + 1):
        rng.shuffle(order)
        for step in range(steps_per_epoch):
            chunk = [train[i] for i in order[step * batch_size : (step + 1) * batch_size]]
            batch = train.scorer.batch(chunk)  # type: ignore[attr-defined]
            loss = torch.nn.functional.cross_entropy(model_fn(live, batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0:
                log(f"epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.4f}")
        val_logits, val_labels = logits_of(model_fn, {n: p.detach() for n, p in live.items()}, val)
        metrics = flaplace.classification_metrics(val_logits.softmax(-1), val_labels)
        history.append({"epoch": epoch, **metrics})
        log(f"epoch {epoch} validation {metrics}")
        if metrics["nll"] < best[0]:
            best = (metrics["nll"], {n: p.detach().clone() for n, p in live.items()}, epoch)
    return best[1], best[2], history


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp())


class JacobianCache:
    """Per-batch Jacobians, kept for a set reused many times (the validation set of the grid)."""

    def __init__(self, model_fn, params, batches, method: str):
        self.items = []
        for b in batches:
            jac = flaplace.per_example_jacobians(model_fn, params, b, method=method)
            self.items.append(jac)

    def f_var(self, posterior, names=None) -> torch.Tensor:
        cache = flaplace.predictive_precompute(posterior)
        out = []
        for jac in self.items:
            sub = jac if names is None else {n: jac[n] for n in names}
            out.append(flaplace.predictive_covariance(cache, sub))
        return torch.cat(out)


def restrict(posterior, names):
    return posterior._replace(
        mean={n: posterior.mean[n] for n in names},
        factors={n: posterior.factors[n] for n in names},
        prior_precision={n: posterior.prior_precision[n] for n in names}
        if isinstance(posterior.prior_precision, dict)
        else posterior.prior_precision,
    )


def mc(f_mu, f_var, seed=0):
    return flaplace.predictive_probs(
        f_mu, f_var, link="mc", n_samples=2000, generator=torch.Generator().manual_seed(seed)
    )


def paired_bootstrap(a: np.ndarray, b: np.ndarray, labels: np.ndarray, n: int = 2000, seed: int = 0):
    """95% intervals of metric(a) - metric(b), resampling test examples (paired).

    By `flaplace.app.stats.paired_bootstrap` (``scipy.stats.bootstrap``, percentile intervals);
    results written before it replaced this script's own loop used other random draws, so their
    intervals differ slightly from a rerun (the point differences are the same).
    """
    out: dict[str, float] = {}
    found = stats.paired_bootstrap(
        torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(labels).long(),
        metrics=("nll", "brier", "accuracy", "ece"), n_resamples=n, seed=seed,
    )  # fmt: skip
    for k, v in found.items():
        out[f"{k}_diff"] = float(v["diff"])
        out[f"{k}_diff_lo"], out[f"{k}_diff_hi"] = (float(x) for x in v["ci95"])
    return out


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    s = np.concatenate([scores_pos, scores_neg])
    ranks = np.argsort(np.argsort(s)) + 1.0
    # average ranks of ties
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    n1, n0 = len(scores_pos), len(scores_neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def entropy(p: torch.Tensor) -> np.ndarray:
    return (-(p * p.clamp_min(1e-12).log()).sum(1)).numpy()


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def markdown(records: list[dict[str, Any]]) -> str:
    """The quality table (one row per task and method) with paired intervals against MAP."""

    def interval(r: dict[str, Any], key: str, ref: str) -> str:
        lo, hi = r.get(f"vs_{ref}_{key}_diff_lo"), r.get(f"vs_{ref}_{key}_diff_hi")
        if lo is None:
            return ""
        return f"{r[f'vs_{ref}_{key}_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    lines = [
        "| task | method | λ | accuracy | NLL | ECE | Brier | NLL − MAP [95%] | NLL − temp. [95%] | n_test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tasks = ["arc_easy", "openbookqa", "boolq"]
    methods = ["map", "temperature", "flaplace", "flaplace-val", "flaplace-informed", "last_layer"]
    methods += ["flaplace-lora_B", "laplace-torch", "bayesian-lora"]

    def order(r: dict[str, Any]) -> tuple[int, int, str]:
        task, method = r["task"].split("->")[0], r["method"]
        rank = tasks.index(task) if task in tasks else len(tasks)
        return rank + ("->" in r["task"]) * 10, methods.index(method) if method in methods else 99, method

    for r in sorted(records, key=order):
        lam = f"{r['lambda']:.3g}" if "lambda" in r else ""
        lines.append(
            f"| {r['task']} | {r['method']} | {lam} | {r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} "
            f"| {r['brier']:.3f} | {interval(r, 'nll', 'map')} | {interval(r, 'nll', 'temperature')} "
            f"| {r['n_test']} |"
        )
    return "\n".join(lines)


def write_records(out: Path, records: list[dict[str, Any]]) -> None:
    """Replace the records of the same (task, method) in ``out`` and keep the others."""
    existing = json.loads(out.read_text()) if out.exists() else []
    new = {(x["task"], x["method"]) for x in records}
    keep = [r for r in existing if (r["task"], r["method"]) not in new]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(keep + records, indent=1) + "\n")


def run_peers(args, model, scorer, params, train, val_batches, splits, times, best_epoch, cache) -> None:
    """laplace-torch and bayesian-lora rows on the cached MAP weights, with the same test examples."""
    if cache is None or not cache.exists():
        raise SystemExit(
            "--peers needs --cache-dir holding this task's MAP (run the task without --peers first)"
        )
    model_fn = scorer.model_fn
    bs = args.batch_size
    test = splits["test"][: args.peers_n_test or len(splits["test"])]
    # the peers vmap their Jacobians over the B*C outputs: one test example at a time
    test_batches = scorer.batches(test, 1)
    val_mu, val_labels = logits_of(model_fn, params, val_batches)
    temperature = fit_temperature(val_mu, val_labels)
    mu, labels = logits_of(model_fn, params, test_batches)
    probs = {"map": mu.softmax(-1), "temperature": (mu / temperature).softmax(-1)}
    kfac_cache = cache.with_name(f"{args.task}_kfac.pt")
    if kfac_cache.exists():
        log_likelihood = torch.load(kfac_cache, weights_only=False)[1].log_likelihood.detach().float()
    else:
        train_mu, train_labels = logits_of(model_fn, params, scorer.batches(list(train), bs))
        log_likelihood = -torch.nn.functional.cross_entropy(train_mu, train_labels, reduction="sum")
    forward = peers.PeerForward(model, scorer)
    labels_np = labels.numpy()
    for method in args.peer_methods.split(","):
        clock = time.perf_counter()
        try:
            if method == "laplace-torch":
                p, extra = peers.laplace_torch_probs(
                    forward, scorer.batches(list(train), bs), len(train), test_batches, 2000
                )
            else:
                # two examples a batch: bayesian-lora's variance squeezes the Jacobian, which
                # drops the batch axis of a batch of one
                p, extra = peers.bayesian_lora_probs(
                    forward, list(train), scorer, scorer.batches(test, 2), log_likelihood, args.rank, 2000
                )
        except Exception as error:  # noqa: BLE001
            log(f"{method} failed: {type(error).__name__}: {error}")
            continue
        times[method] = time.perf_counter() - clock
        log(f"{method}: {extra} in {times[method]:.0f} s")
        # each peer's record and probabilities are written as soon as it finishes
        p = p.detach().float()
        save_probs(cache.with_name(f"{args.task}_probs.pt"), {method: p}, labels)
        metrics = flaplace.classification_metrics(p, labels)
        record = {
            "task": args.task,
            "method": method,
            **metrics,
            "n_test": len(labels),
            "n_train": len(train),
            "n_val": len(splits["validation"]),
            "best_epoch": best_epoch,
            "link": "mc (2000 samples)",
            "map_on_same_examples": flaplace.classification_metrics(probs["map"], labels),
            "temperature_on_same_examples": flaplace.classification_metrics(probs["temperature"], labels),
            "ours_on_same_examples": peers.ours_on_same_questions(
                cache.with_name(f"{args.task}_probs.pt"), labels
            ),
            **extra,
            "times_s": {k: round(v, 1) for k, v in times.items()},
        }
        for ref in ("map", "temperature"):
            found = paired_bootstrap(p.double().numpy(), probs[ref].double().numpy(), labels_np)
            record.update({f"vs_{ref}_{k}": v for k, v in found.items()})
        write_records(Path(args.out), [record])
        log(
            f"test {method}: "
            + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "nll", "ece", "brier"))
        )


def save_probs(path: Path, probs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    """Add these methods' test probabilities to ``path`` (kept only if the labels are the same)."""
    saved = torch.load(path) if path.exists() else {"labels": labels, "probs": {}}
    if not torch.equal(saved["labels"][: len(labels)], labels):
        saved = {"labels": labels, "probs": {}}
    saved["probs"].update({k: v.detach().double() for k, v in probs.items()})
    torch.save(saved, path)


def plot_reliability(task: str, cache_dir: Path) -> Path:
    """docs/img/llm_reliability_<task>.png from the probabilities a task's run saved."""
    from flaplace.app.plots import reliability_diagram

    saved = torch.load(cache_dir / f"{task}_probs.pt")
    labels = saved["labels"]
    wanted = ("map", "temperature", "flaplace", "laplace-torch", "bayesian-lora")
    # the peers may have seen only the first test examples: plot every method on those
    n = min(len(saved["probs"][m]) for m in wanted if m in saved["probs"])
    out = ROOT / "docs" / "img" / f"llm_reliability_{task}.png"
    reliability_diagram(
        {m: saved["probs"][m][:n] for m in wanted if m in saved["probs"]},
        labels[:n],
        out,
        title=f"{task}: SmolLM2-135M + LoRA, {n} test questions",
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument(
        "--layers", type=int, default=8, help="adapt the last this many decoder blocks (0: all of them)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--fisher", default="mc")
    parser.add_argument("--sharing", default="expand")
    parser.add_argument(
        "--shift", choices=sorted(TASKS), default=None, help="also evaluate on this task's test"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--normalize", action="store_true", help="length-normalised cloze scores")
    parser.add_argument(
        "--unconditional", help='cloze scores minus those after this context (e.g. "Answer:")'
    )
    parser.add_argument(
        "--cache-dir", default=None, help="keep the MAP weights and K-FAC factors here and reuse them"
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="only the laplace-torch and bayesian-lora rows, on the MAP of --cache-dir (replaces only those rows)",
    )
    parser.add_argument(
        "--peers-n-test", type=int, default=None, help="test examples for the peers (default --n-test)"
    )
    parser.add_argument(
        "--peer-methods", default="laplace-torch,bayesian-lora", help="comma-separated peers for --peers"
    )
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    plots_help = "only draw docs/img/llm_reliability_<task>.png from the probabilities in --cache-dir"
    parser.add_argument("--plots", action="store_true", help=plots_help)
    same_help = (
        "only recompute the peers' rows of flaplace on their questions from --cache-dir's probabilities"
    )
    parser.add_argument("--same-questions", action="store_true", help=same_help)
    args = parser.parse_args(argv)
    if args.table:
        records = json.loads(Path(args.out).read_text())
        print(markdown(records) + "\n\n" + peers.peers_markdown(records))
        return
    if args.plots or args.same_questions:
        if args.task is None or args.cache_dir is None:
            parser.error("--plots and --same-questions need --task and the --cache-dir of that task's run")
        probs = Path(args.cache_dir) / f"{args.task}_probs.pt"
        print(
            plot_reliability(args.task, Path(args.cache_dir))
            if args.plots
            else peers.refresh(args.out, args.task, probs)
        )
        return
    if args.task is None:
        parser.error("--task is required (unless --table)")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    import peft

    model, tok = load_causal_lm(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    layers = None if args.layers == 0 else list(range(n_layers - args.layers, n_layers))
    config = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        layers_to_transform=layers,
    )
    model = peft.get_peft_model(model, config)
    model.eval()
    live = {n: p for n, p in model.named_parameters() if "lora" in n}
    for p in live.values():
        p.requires_grad_(True)
    params0 = flaplace.select_params(model, "lora")
    scorer = Scorer(model, tok, params0, args.task, args.max_length, args.normalize, args.unconditional)
    model_fn = scorer.model_fn
    times["load"] = time.perf_counter() - clock

    rng = random.Random(args.seed)
    splits = {}
    for split, n in (("train", args.n_train), ("validation", args.n_val), ("test", args.n_test)):
        examples = TASKS[args.task](split)
        rng.shuffle(examples)
        splits[split] = examples[:n]
    log(f"{args.task}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    class TrainList(list):
        scorer: Any

    train = TrainList(splits["train"])
    train.scorer = scorer
    bs = args.batch_size
    val_batches = scorer.batches(splits["validation"], bs)
    test_batches = scorer.batches(splits["test"], bs)

    cache = None if args.cache_dir is None else Path(args.cache_dir) / f"{args.task}_map.pt"
    if cache is not None:  # made before the training, not after it
        cache.parent.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    if cache is not None and cache.exists():
        map_params, best_epoch, history, times["map_training"] = torch.load(cache)
    else:
        map_params, best_epoch, history = train_map(
            model_fn,
            live,
            train,
            val_batches,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=bs,
            seed=args.seed,
            warmup=args.warmup,
        )
        times["map_training"] = time.perf_counter() - clock
        if cache is not None:
            torch.save((map_params, best_epoch, history, times["map_training"]), cache)
    with torch.no_grad():
        for n, p in live.items():
            p.copy_(map_params[n])
    params = {n: p.detach() for n, p in live.items()}
    log(f"MAP: best epoch {best_epoch}; {sum(p.numel() for p in params.values())} LoRA weights")
    if args.peers:
        run_peers(args, model, scorer, params, train, val_batches, splits, times, best_epoch, cache)
        return

    # K-FAC on the training set at the MAP
    kfac_cache = None if cache is None else cache.with_name(f"{args.task}_kfac.pt")
    clock = time.perf_counter()
    train_batches = scorer.batches(list(train), bs)
    if kfac_cache is not None and kfac_cache.exists():
        factors, state, times["kfac"] = torch.load(kfac_cache, weights_only=False)
    else:
        factors, state = flaplace.fit_kfac(
            model_fn,
            params,
            train_batches,
            fisher=args.fisher,
            sharing=args.sharing,
            return_state=True,
            progress=False,
            generator=torch.Generator().manual_seed(args.seed),
        )
        times["kfac"] = time.perf_counter() - clock
        if kfac_cache is not None:
            torch.save((factors, state, times["kfac"]), kfac_cache)
    log(f"K-FAC done in {times['kfac']:.0f} s; training log-likelihood {float(state.log_likelihood):.2f}")

    clock = time.perf_counter()
    posterior = flaplace.make_posterior(factors, params, prior_precision=1.0)
    posterior, _ = flaplace.tune_prior_evidence(posterior, state.log_likelihood, progress=False)
    lam_evidence = float(next(iter(posterior.prior_precision.values())))
    last_block = max(int(m.group(1)) for n in params for m in [re.search(r"layers\.(\d+)\.", n)] if m)
    last_names = [n for n in params if f"layers.{last_block}." in n]
    last_post = flaplace.make_posterior(
        {n: factors[n] for n in last_names}, {n: params[n] for n in last_names}, prior_precision=1.0
    )
    last_post, _ = flaplace.tune_prior_evidence(last_post, state.log_likelihood, progress=False)
    lam_last = float(next(iter(last_post.prior_precision.values())))
    # issue 16 variant: a posterior over the lora_B weights only (lora_A fixed at the MAP)
    b_names = [n for n in params if "lora_B" in n]
    b_post = flaplace.make_posterior(
        {n: factors[n] for n in b_names}, {n: params[n] for n in b_names}, prior_precision=1.0
    )
    b_post, _ = flaplace.tune_prior_evidence(b_post, state.log_likelihood, progress=False)
    lam_b = float(next(iter(b_post.prior_precision.values())))
    times["prior_evidence"] = time.perf_counter() - clock
    log(f"evidence: lambda {lam_evidence:.4g} (all LoRA), {lam_last:.4g} (last block {last_block})")

    # Validation: MAP logits, temperature, and the grid of prior precisions on cached Jacobians
    clock = time.perf_counter()
    val_cache = JacobianCache(model_fn, params, val_batches, "capture")
    times["val_jacobians"] = time.perf_counter() - clock
    val_mu, val_labels = logits_of(model_fn, params, val_batches)
    temperature = fit_temperature(val_mu, val_labels)

    def val_nll(post) -> float:
        return flaplace.nll(mc(val_mu, val_cache.f_var(post)), val_labels)

    clock = time.perf_counter()
    grid = [10.0**k for k in np.arange(-2, 5.01, 0.5)]
    tuned_val, table = flaplace.tune_prior_grid(posterior, val_nll, grid=grid, progress=False)
    lam_val = float(next(iter(tuned_val.prior_precision.values())))
    times["prior_grid_validation"] = time.perf_counter() - clock
    val_metrics = {
        "map": flaplace.classification_metrics(val_mu.softmax(-1), val_labels),
        "flaplace": flaplace.classification_metrics(mc(val_mu, val_cache.f_var(posterior)), val_labels),
    }
    log(f"validation: T={temperature:.3f}, lambda_val={lam_val:.4g}; {val_metrics}")
    val_cache.items.clear()  # free the validation Jacobians

    # Test
    def evaluate(batches):
        clock = time.perf_counter()
        mus, labels = [], []
        fvars: dict[str, list[torch.Tensor]] = {
            "flaplace": [],
            "flaplace-val": [],
            "last_layer": [],
            "flaplace-lora_B": [],
            "flaplace-informed": [],
        }
        caches = {
            "flaplace": flaplace.predictive_precompute(posterior),
            "flaplace-val": flaplace.predictive_precompute(tuned_val),
            "last_layer": flaplace.predictive_precompute(last_post),
            "flaplace-lora_B": flaplace.predictive_precompute(b_post),
            # the predictive flaplace run ships: the evidence's posterior, informed directions only
            "flaplace-informed": flaplace.predictive_precompute(posterior, "informed"),
        }
        for b in batches:
            jac, mu = jacobians_and_logits(model_fn, params, b, method="capture")
            mus.append(mu)
            labels.append(b["labels"])
            fvars["flaplace"].append(flaplace.predictive_covariance(caches["flaplace"], jac))
            fvars["flaplace-val"].append(flaplace.predictive_covariance(caches["flaplace-val"], jac))
            fvars["flaplace-informed"].append(
                flaplace.predictive_covariance(caches["flaplace-informed"], jac)
            )
            fvars["last_layer"].append(
                flaplace.predictive_covariance(caches["last_layer"], {n: jac[n] for n in last_names})
            )
            fvars["flaplace-lora_B"].append(
                flaplace.predictive_covariance(caches["flaplace-lora_B"], {n: jac[n] for n in b_names})
            )
        mu = torch.cat(mus)
        probs = {"map": mu.softmax(-1), "temperature": (mu / temperature).softmax(-1)}
        extra = {}
        for k, v in fvars.items():
            var = torch.cat(v)
            probs[k] = mc(mu, var)
            diff_var = (var.diagonal(dim1=1, dim2=2).sum(1) - var.sum((1, 2)) / var.shape[1]).mean()
            extra[k] = {
                "mean_logit_variance": float(var.diagonal(dim1=1, dim2=2).mean()),
                "mean_centred_var": float(diff_var),
            }
        return probs, torch.cat(labels), time.perf_counter() - clock, extra

    probs, labels, times["test_predictive"], extra = evaluate(test_batches)
    if cache is not None:  # per-example probabilities, for the reliability diagrams (--plots)
        save_probs(cache.with_name(f"{args.task}_probs.pt"), probs, labels)
    lam = {
        "flaplace": lam_evidence,
        "flaplace-val": lam_val,
        "last_layer": lam_last,
        "flaplace-lora_B": lam_b,
        "flaplace-informed": lam_evidence,
    }
    labels_np = labels.numpy()
    records = []
    common = {
        "task": args.task,
        "n_test": len(labels),
        "n_train": len(train),
        "n_val": len(splits["validation"]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to float32)",
        "lora": f"r={args.rank}, alpha={2 * args.rank}, targets {args.targets}, "
        + ("all blocks" if layers is None else f"blocks {layers[0]}-{layers[-1]}"),
        "scoring": "answer tokens ' yes'/' no' at the last position"
        if args.task == "boolq"
        else f"cloze ({'mean' if args.normalize else 'summed'} log-probability"
        + (f" minus its value after {args.unconditional!r})" if args.unconditional else ")"),
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "lr": args.lr,
        "fisher": args.fisher,
        "sharing": args.sharing,
        "link": "mc (2000 samples)",
        "temperature": temperature,
        "lambda_evidence": lam_evidence,
        "lambda_validation": lam_val,
        "lambda_last_layer": lam_last,
        "lambda_lora_B": lam_b,
        "validation_metrics": val_metrics,
    }
    for method, p in probs.items():
        p_np = p.double().numpy()
        metrics = flaplace.classification_metrics(p, labels)
        record = {**common, "method": method, **metrics}
        if method in lam:
            record["lambda"] = lam[method]
            record.update(extra[method])
        if method != "map":
            record.update(
                {
                    f"vs_map_{k}": v
                    for k, v in paired_bootstrap(p_np, probs["map"].double().numpy(), labels_np).items()
                }
            )
        if method not in ("map", "temperature"):
            record.update(
                {
                    f"vs_temperature_{k}": v
                    for k, v in paired_bootstrap(
                        p_np, probs["temperature"].double().numpy(), labels_np
                    ).items()
                }
            )
        records.append(record)
        log(
            f"test {method}: "
            + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "nll", "ece", "brier"))
        )

    if args.shift:
        shifted = TASKS[args.shift]("test")
        random.Random(args.seed).shuffle(shifted)
        shifted = shifted[: args.n_test]
        s_probs, s_labels, t_shift, _ = evaluate(scorer.batches(shifted, bs))
        times["shift_predictive"] = t_shift
        for method, p in s_probs.items():
            metrics = flaplace.classification_metrics(p, s_labels)
            records.append(
                {
                    **common,
                    "task": f"{args.task}->{args.shift}",
                    "n_test": len(s_labels),
                    "method": method,
                    **metrics,
                    "auroc_entropy_in_vs_shift": auroc(entropy(s_probs[method]), entropy(probs[method])),
                }
            )
            log(f"shift {method}: {metrics} AUROC {records[-1]['auroc_entropy_in_vs_shift']:.3f}")

    for r in records:
        r["times_s"] = {k: round(v, 1) for k, v in times.items()}
        r["validation_history"] = history
        r["lambda_grid_validation_nll"] = table
    write_records(Path(args.out), records)
    log(f"times: {times}")


if __name__ == "__main__":
    main()
