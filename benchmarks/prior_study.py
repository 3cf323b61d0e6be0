"""Issues 16 and 25: which prior (and likelihood temperature) makes Laplace-LoRA help a real LLM.

SmolLM2-135M-Instruct through the same app-wing path as ``flaplace run`` (task reader, prompt
``<text> Answer:`` scored by the next-token logits of the answers, LoRA r=8 / alpha 16 on
``q_proj,v_proj`` of the last 8 blocks), in two regimes:

* ``early``: ``--n-train`` examples, AdamW for at most ``--early-steps`` steps, the MAP kept at
  the step with the lowest validation NLL (checked every ``--eval-every`` steps);
* ``converged``: ``--n-train-converged`` examples, ``--converged-epochs`` epochs, the last
  weights kept (training NLL near 0: an overconfident MAP, as in the Laplace-LoRA paper).

Per regime two MAPs are trained, one per prior: ``zero`` (L2 towards 0, the library's
original convention) and ``init`` (L2 towards the adapters' initialisation ``theta0``: LoRA's
random ``lora_A`` and zero ``lora_B``), both with precision ``--map-prior-precision`` in
``mean NLL + lambda / (2N) ||theta - m||^2``. K-FAC (exact Fisher, dense factors) is fitted
once per MAP. Methods, all with the linearised predictive and the probit link:

* ``map`` / ``map-init``: the MAP's softmax (zero / init MAP);
* ``temperature`` / ``temperature-init``: the MAP's logits over a temperature fitted on validation;
* ``evidence-zero``: zero-mean prior, lambda by the evidence (the original default);
* ``evidence-init``: prior centred at ``theta0``, lambda by the evidence (on the init MAP);
* ``evidence-init-groups``: the same with one lambda for ``lora_A`` and one for ``lora_B``;
* ``evidence-init-lora_B``: a posterior over ``lora_B`` only (``lora_A`` fixed), centred prior;
* ``grid-val`` / ``grid-val-init``: lambda by the lowest validation NLL on a grid (uses validation);
* ``informed-zero`` (the default of issue 16): the ``evidence-zero`` posterior with the predictive
  restricted to the directions the data inform (``predictive_precompute(..., directions="informed")``:
  eigenvalue ``s_i a_j > lambda``); ``informed-init``: the same on the ``evidence-init`` posterior.

Issue 25 (zero prior only; benchmarks/prior_methods.py), every predictive on the MAP's cached
Jacobians with the moments ``(f_mu / T, f_var / T^2)`` (`tempered_moments`):

* ``evidence-temp``: the evidence maximised over lambda and a likelihood temperature ``T`` (exact-
  Fisher K-FAC of ``f / T`` per temperature; ``T = 1, 2, 1/2``, doubling or halving until the
  evidence falls, then ``--refine-steps`` golden-section steps in ``log T``), whole predictive;
  ``evidence-temp-informed``: the same posterior with the informed directions only;
  ``evidence-temp-soft`` / ``-soft-informed``: the best of the evaluated ``T = 1, 2, 4, ...`` (the
  likelihood may only be softened: an interpolating MAP's evidence keeps rising as ``T -> 0``);
  ``evidence-temp-fit`` / ``-fit-informed``: the climb ``T = 1, 2, 4, ...`` that goes on while both
  the evidence and the training log-likelihood ``LL_T`` rise (`fit_guarded_climb`);
  ``evidence-temp-bic`` / ``-bic-informed``: the same with each step's ``LL_T`` gain above
  ``log(N) / 2``, the BIC price of ``T``: what the library's ``prior="evidence_temperature"``
  computes (`soften_by_evidence`);
* ``validation-temp``: ``tune_prior_temperature_nll`` started at the evidence's ``(lambda, T)``:
  lambda and ``T`` jointly on the validation NLL of the whole predictive (its family holds
  temperature scaling, lambda -> infinity); ``validation-temp-t1``: the same on the ``T = 1``
  factors, started at the ``T = 1`` evidence's lambda; ``validation-temp-grid``:
  `tune_prior_temperature_grid` on the ``T = 1`` factors (lambda on a grid plus the MAP limit,
  the best ``T`` for each, informed directions); ``validation-temp-akaike``: what the library
  ships for validation data, the grid's posterior averaged with temperature scaling by Akaike
  weights (`scaling_mixture`: one nat of validation log-likelihood is the price of lambda);
* ``default`` (no validation data) and ``default-val`` (validation data): copies of the rows named
  by ``--default`` (``evidence-temp-bic-informed``) and ``--default-val`` (``validation-temp-akaike``);
* ``online-map``: a second MAP trained with the prior tuned online (`build_online_evidence`,
  refreshed every epoch on that epoch's batches, the loss ``mean NLL + prior_penalty``; same
  steps, learning rate and keeping rule as the MAP); ``online``: its ``online_posterior`` after a
  last refresh at the kept weights, whole predictive; ``online-informed``: informed directions.
  Their ``*_vs_map`` fields compare with the plain MAP.

SST-2 goes through ``flaplace run``'s task reader and prompt; ARC-Easy and OpenBookQA
(``--normalize``) are scored by cloze and BoolQ by `` yes``/`` no`` through llm_quality.py's
scorer, on the same readers and splits as the quality table.

Every record has ``nll_diff_vs_map_lo/hi``: the paired bootstrap 95% interval of its NLL minus
the NLL of the MAP it was built on, and ``*_vs_map0`` against the zero-prior MAP (the MAP a
user of the original defaults gets) and ``*_vs_temperature`` against that MAP's temperature
scaling. Recipes are chosen on validation only; the test split is read once per MAP.

Usage (from the repository root; MAPs, factors per temperature, Jacobians and each MAP's
evaluation are cached in ``--cache-dir``, so an interrupted run resumes)::

    PYTHONPATH=$PWD python benchmarks/prior_study.py --task sst2 --cache-dir /tmp/prior/cache

Writes (replacing the same task's records) ``benchmarks/results/prior_study.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import flaplace  # noqa: E402
from flaplace.app import hf, lora, stats  # noqa: E402
from flaplace.app.stages import fit_factors, link_probs  # noqa: E402
from flaplace.app.tasks import load_task  # noqa: E402
from flaplace.jacobian_cache import JacobianCache, cache_jacobians, cached_covariance  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))
from llm_tasks import DATA, Scorer  # noqa: E402  (../shared/data or $FLAPLACE_DATA_DIR; the scoring)
from llm_tasks import TASKS as LLM_TASKS  # noqa: E402
from prior_methods import (  # noqa: E402
    bars,
    cached,
    evidence_over_temperature,
    fit_guarded_climb,
    linearised_evidence,
    online_map,
    summed_nll_gradient,
)

from flaplace.online import online_posterior  # noqa: E402
from flaplace.temperature import tempered_moments  # noqa: E402
from flaplace.tempered_validation import (  # noqa: E402
    mix_with_scaling,
    scaling_mixture,
    tune_prior_temperature_grid,
    tune_prior_temperature_nll,
)

RESULTS = Path(os.environ.get("PRIOR_STUDY_RESULTS", ROOT / "benchmarks" / "results" / "prior_study.json"))
GRID = [10.0 ** (k / 2) for k in range(-4, 11)]  # 1e-2 ... 1e5, two per decade


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def validation_nll(model_fn, params, batches) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = torch.cat([model_fn(params, b) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    return float(F.cross_entropy(logits.double(), labels)), logits


def train(
    model_fn,
    init,
    names,
    train_batches,
    val_batches,
    *,
    steps,
    lr,
    precision,
    centre,
    n_train,
    eval_every,
    keep,
):
    """AdamW on ``mean NLL + precision/(2N) ||theta - centre||^2`` (as ``stages.train_map``), linear decay.

    ``keep="best"`` returns the weights with the lowest validation NLL among the checks,
    ``"last"`` the final ones. Returns ``(params, history)``.
    """
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in init.items()}
    optimizer = torch.optim.AdamW(leaves.values(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    scale = precision / (2 * n_train)
    target = {n: torch.zeros_like(init[n]) if centre is None else centre[n] for n in names}
    history: list[dict[str, float]] = []
    best = (math.inf, {n: p.detach().clone() for n, p in leaves.items()}, 0)
    losses: list[float] = []
    for step in range(1, steps + 1):
        batch = train_batches[(step - 1) % len(train_batches)]
        nll = F.cross_entropy(model_fn(leaves, batch).float(), batch["labels"])
        penalty = sum((leaves[n].float() - target[n].float()).square().sum() for n in names)
        loss = nll + scale * penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(nll))
        if step % eval_every == 0 or step == steps:
            current = {n: p.detach() for n, p in leaves.items()}
            checked = keep == "best" or step == steps
            val = validation_nll(model_fn, current, val_batches)[0] if checked else math.nan
            history.append(
                {
                    "step": step,
                    "train_nll": sum(losses[-eval_every:]) / len(losses[-eval_every:]),
                    "val_nll": val,
                }
            )
            log(f"  step {step}: train NLL {history[-1]['train_nll']:.4f}, validation NLL {val:.4f}")
            if keep == "best" and val < best[0]:
                best = (val, {n: p.detach().clone() for n, p in current.items()}, step)
    if keep == "best":
        return best[1], history, best[2]
    return {n: p.detach().clone() for n, p in leaves.items()}, history, steps


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits.double() / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp())


def restrict(cache: JacobianCache, names: list[str]) -> JacobianCache:
    return JacobianCache(cache.logits, [{n: j[n] for n in names} for j in cache.jacobians])


def only(posterior, names):
    return flaplace.make_posterior(
        {n: posterior.factors[n] for n in names},
        {n: posterior.mean[n] for n in names},
        {n: posterior.prior_precision[n] for n in names},
        prior_mean=None if posterior.prior_mean is None else {n: posterior.prior_mean[n] for n in names},
    )


def lam_of(posterior) -> float | dict[str, float]:
    values = {n: float(v) for n, v in posterior.prior_precision.items()}
    distinct = sorted(set(values.values()))
    if len(distinct) == 1:
        return distinct[0]
    a = [v for n, v in values.items() if "lora_A" in n]
    b = [v for n, v in values.items() if "lora_B" in n]
    return {"lora_A": a[0], "lora_B": b[0]} if a and b else values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2", help="sst2 (flaplace run's path) or one of llm_tasks.TASKS")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "minilm"])
    parser.add_argument("--data-path", default=None, help="default: ../shared/data/<task>")
    parser.add_argument("--regimes", default="early,converged")
    parser.add_argument("--priors", default="zero,init")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-train-converged", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--early-steps", type=int, default=48)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--converged-epochs", type=int, default=15)
    parser.add_argument("--map-prior-precision", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--normalize", action="store_true", help="length-normalised cloze scores")
    parser.add_argument(
        "--refine-steps", type=int, default=2, help="golden-section steps of the evidence's T"
    )
    # the shipped choices: the evidence over lambda and T >= 1 with the informed predictive, and
    # (lambda, T) on validation by the grid (temperature scaling included), informed predictive
    parser.add_argument("--default", default="evidence-temp-bic-informed", help="the row copied as `default`")
    parser.add_argument(
        "--default-val", default="validation-temp-akaike", help="the row copied as `default-val`"
    )
    parser.add_argument("--no-online", action="store_true", help="skip the online-tuned MAP")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    cache_dir = None if args.cache_dir is None else Path(args.cache_dir)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    data_path = args.data_path or str(DATA / args.task)
    n_train_max = max(args.n_train, args.n_train_converged)
    # ARC-Easy, OpenBookQA (cloze) and BoolQ (" yes"/" no") go through llm_quality.py's scorer,
    # every other task through flaplace run's task reader and prompt
    llm_task = args.model == "smollm2" and args.task in LLM_TASKS
    sizes = {"train": n_train_max, "validation": args.n_val, "test": args.n_test}
    if llm_task:
        split_of = {}
        for split, size in sizes.items():
            examples = LLM_TASKS[args.task](split)
            random.Random(args.seed).shuffle(examples)
            split_of[split] = examples[:size]
        n_classes = len(split_of["train"][0][1])
    else:
        task = load_task(args.task, data_path, max_examples=sizes, seed=args.seed)
        split_of = {split: task.split(split) for split in sizes}
        n_classes = task.n_classes
    clock = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.model == "minilm":  # all-MiniLM-L6-v2 with a new two-label head: LoRA on every block
        from flaplace.app.cli import demo_model_path

        loaded = hf.load_model(demo_model_path(), n_classes=n_classes, kind="seq_cls")
        targets, last_layers = ("query", "value"), None
    else:
        loaded = hf.load_model("smollm2", n_classes=n_classes, kind="causal")
        targets, last_layers = ("q_proj", "v_proj"), args.layers
    model = lora.attach_lora(loaded, rank=8, alpha=16.0, targets=targets, last_layers=last_layers)
    model.eval()
    names = lora.laplace_param_names(model)  # the posterior's blocks (LoRA, a new head's weight)
    trainable = lora.trainable_param_names(model)  # also a new head's bias (no prior)
    named = dict(model.named_parameters())
    start = {n: named[n].detach().clone() for n in trainable}
    theta0 = {n: start[n] for n in names}
    model.requires_grad_(False)
    if llm_task:  # no new head: the trained weights are the posterior's
        scorer = Scorer(model, loaded.tokenizer, names, args.task, args.max_length, args.normalize)
        train_fn = model_fn = scorer.model_fn
    else:
        train_fn = hf.model_function(model, trainable, loaded, task)
        model_fn = hf.model_function(model, names, loaded, task)
    log(f"load {time.perf_counter() - clock:.0f} s; {sum(p.numel() for p in theta0.values())} LoRA weights")
    norm_a0 = math.sqrt(sum(float(p.square().sum()) for n, p in theta0.items() if "lora_A" in n))

    def encoded(examples, size):
        if llm_task:
            return scorer.batches(examples, size)
        return hf.encode_batches(examples, loaded, task, batch_size=size, max_length=args.max_length)

    val_batches = encoded(split_of["validation"], args.eval_batch_size)
    test_batches = encoded(split_of["test"], args.eval_batch_size)
    val_labels = torch.cat([b["labels"] for b in val_batches])
    test_labels = torch.cat([b["labels"] for b in test_batches])

    def probs(f_mu, f_var):
        return link_probs(f_mu, f_var, link="probit", n_samples=1, seed=args.seed)

    def jacobians_of(params):  # (validation, test) logits and Jacobians at params
        return tuple(
            cache_jacobians(model_fn, params, b, method="capture") for b in (val_batches, test_batches)
        )

    records: list[dict[str, Any]] = []
    for regime in args.regimes.split(","):
        n_train = args.n_train if regime == "early" else args.n_train_converged
        train_examples = split_of["train"][:n_train]
        shuffled = list(train_examples)
        random.Random(args.seed).shuffle(shuffled)
        steps_per_epoch = math.ceil(n_train / args.batch_size)
        if regime == "early":
            steps, keep = args.early_steps, "best"
        else:
            steps, keep = args.converged_epochs * steps_per_epoch, "last"
        # one fixed shuffled order per epoch is enough here: batches cycle through the examples
        train_batches = encoded(shuffled, args.batch_size)
        kfac_batches = encoded(train_examples, args.eval_batch_size)
        probs_by: dict[str, torch.Tensor] = {}
        lam_by: dict[str, Any] = {}
        info_by: dict[str, dict[str, Any]] = {}
        base_of: dict[str, str] = {}
        temperature_of: dict[str, float] = {}
        for prior in args.priors.split(","):
            centre = theta0 if prior == "init" else None
            tag = f"{args.model}_{args.task}_{regime}_{prior}_n{n_train}_s{steps}_lr{args.lr}_p{args.map_prior_precision}"
            map_file = None if cache_dir is None else cache_dir / f"{tag}_map.pt"
            eval_file = None if cache_dir is None else cache_dir / f"{tag}_n{len(test_labels)}_eval25.pt"
            before = {id(store): set(store) for store in (probs_by, lam_by, info_by, base_of, temperature_of)}
            if eval_file is not None and eval_file.exists():  # this MAP's rows were computed already
                saved = torch.load(eval_file, weights_only=False)
                for store, part in zip(
                    (probs_by, lam_by, info_by, base_of, temperature_of), saved, strict=True
                ):
                    store.update(part)
                log(f"{regime}/{prior}: evaluation from {eval_file}")
                if prior != "zero" or {"validation-temp-akaike", "linearised-evidence"} <= set(probs_by):
                    continue  # else: top up the rows added since (cheap from the caches)
            clock = time.perf_counter()
            if map_file is not None and map_file.exists():
                params, history, best_step = torch.load(map_file)
                log(f"{regime}/{prior}: MAP from {map_file}")
            else:
                log(f"{regime}/{prior}: MAP training, {steps} steps on {n_train} examples")
                params, history, best_step = train(
                    train_fn, start, names, train_batches, val_batches, steps=steps, lr=args.lr,
                    precision=args.map_prior_precision, centre=centre, n_train=n_train,
                    eval_every=args.eval_every if regime == "early" else steps_per_epoch, keep=keep,
                )  # fmt: skip
                if map_file is not None:
                    torch.save((params, history, best_step), map_file)
            t_map = time.perf_counter() - clock
            with torch.no_grad():  # a head bias (trained, not in the posterior) lives in the model
                for n in trainable:
                    named[n].copy_(params[n])
            params = {n: params[n] for n in names}
            clock = time.perf_counter()
            kfac_file = None if cache_dir is None else cache_dir / f"{tag}_kfac.pt"
            if kfac_file is not None and kfac_file.exists():
                factors, log_likelihood = torch.load(kfac_file, weights_only=False)
            else:
                factors, log_likelihood = fit_factors(
                    model_fn, params, kfac_batches, fisher="exact", sharing="expand", n_kfac=10,
                    lr_threshold=None, seed=args.seed, progress=False,
                )  # fmt: skip
                if kfac_file is not None:
                    torch.save((factors, log_likelihood), kfac_file)
            t_kfac = time.perf_counter() - clock
            clock = time.perf_counter()
            jac_file = None if cache_dir is None else cache_dir / f"{tag}_n{len(test_labels)}_jac.pt"
            val_cache, test_cache = cached(jac_file, jacobians_of, params)
            t_jac = time.perf_counter() - clock

            def norm(part, minus=None, params=params):  # || params - minus || over the weights named part
                return math.sqrt(sum(float((params[n] - (0 if minus is None else minus[n])).square().sum()) for n in names if part in n))  # fmt: skip

            distance = {part: norm(part, centre) for part in ("lora_A", "lora_B")}
            norm_a, move_a = norm("lora_A"), norm("lora_A", theta0)
            info = {
                "map_steps": steps, "best_step": best_step, "history": history, "train_log_likelihood": log_likelihood,
                "n_train": n_train, "lora_A_norm_init": norm_a0, "lora_A_norm_map": norm_a, "lora_A_moved": move_a,
                "distance_to_prior_mean": distance, "times_s": {"map": t_map, "kfac": t_kfac, "jacobians": t_jac},
            }  # fmt: skip
            log(
                f"{regime}/{prior}: best step {best_step}; |A0| {norm_a0:.2f}, |A| {norm_a:.2f}, moved {move_a:.2f}"
            )
            suffix = "" if prior == "zero" else "-init"
            f_mu = test_cache.logits
            probs_by[f"map{suffix}"] = torch.softmax(f_mu.double(), -1)
            temperature = fit_temperature(val_cache.logits, val_labels)
            probs_by[f"temperature{suffix}"] = torch.softmax(f_mu.double() / temperature, -1)
            lam_by[f"temperature{suffix}"] = None
            info_by[f"temperature{suffix}"] = {**info, "temperature": temperature}
            temperature_of[f"temperature{suffix}"] = temperature
            info_by[f"map{suffix}"] = info
            base_of[f"map{suffix}"] = base_of[f"temperature{suffix}"] = f"map{suffix}"
            posterior = flaplace.make_posterior(factors, params, 1.0, prior_mean=centre)
            variants: dict[str, tuple[Any, list[str]]] = {}
            tuned, hist = flaplace.tune_prior_evidence(posterior, log_likelihood, progress=False)
            variants[f"evidence-{prior}"] = (tuned, names)
            gamma = sum(
                float((e / (e + v)).sum())
                for n in names
                for e, v in [(
                    posterior.factors[n].S.values.clamp(min=0)[:, None] * posterior.factors[n].A.values.clamp(min=0)[None, :],
                    tuned.prior_precision[n],
                )]
            )  # fmt: skip
            info_by[f"evidence-{prior}"] = {**info, "log_evidence": hist[-1]["log_evidence"], "gamma": gamma}
            if prior == "zero":  # one lambda for lora_A and one for lora_B, by the evidence
                grouped, _ = flaplace.tune_prior_evidence(posterior, log_likelihood, per_block=["lora_A", "lora_B"], progress=False)  # fmt: skip
                variants["evidence-zero-groups"] = variants["informed-zero-groups"] = (grouped, names)
            if prior == "init":
                lora_names = [n for n in names if "lora_" in n]
                grouped, _ = flaplace.tune_prior_evidence(
                    posterior,
                    log_likelihood,
                    per_block=["lora_A", "lora_B"]
                    + (["modules_to_save"] if len(names) > len(lora_names) else []),
                    progress=False,
                )
                variants["evidence-init-groups"] = (grouped, names)
                b_names = [n for n in names if "lora_B" in n]
                b_tuned, _ = flaplace.tune_prior_evidence(
                    only(posterior, b_names), log_likelihood, progress=False
                )
                variants["evidence-init-lora_B"] = (b_tuned, b_names)

            def val_nll(candidate, cache=val_cache, directions="all"):
                f_var = cached_covariance(candidate, cache, directions)
                return flaplace.nll(probs(cache.logits, f_var), val_labels)

            grid_post, table = flaplace.tune_prior_grid(posterior, val_nll, grid=GRID, progress=False)
            variants[f"grid-val{suffix}"] = (grid_post, names)
            # the issue-16 default: zero-centred prior, lambda by the evidence, and the predictive
            # restricted to the directions the data inform (predictive_precompute's "informed")
            informed = f"informed-{prior}"
            variants[informed] = (tuned, names)
            for method, (post, subset) in variants.items():
                cache = test_cache if subset is names else restrict(test_cache, subset)
                directions = "informed" if method.startswith("informed-") else "all"
                f_var = cached_covariance(post, cache, directions)
                probs_by[method] = probs(f_mu, f_var).double()
                lam_by[method] = lam_of(post)
                base_of[method] = f"map{suffix}"
                info_by.setdefault(method, dict(info))
                info_by[method]["mean_logit_variance"] = float(f_var.diagonal(dim1=1, dim2=2).mean())
                info_by[method]["validation_nll"] = val_nll(
                    post, restrict(val_cache, subset) if subset is not names else val_cache, directions
                )
                log(
                    f"{regime}/{method}: lambda {lam_by[method]}, variance {info_by[method]['mean_logit_variance']:.3g}"
                )
            info_by[f"grid-val{suffix}"]["grid"] = table

            def add(
                method, f_mu, f_var, temperature, post, val_f_mu, val_f_var, extra, info=info, regime=regime,
                stores=(probs_by, lam_by, base_of, temperature_of, info_by),
            ):  # fmt: skip
                probs_by, lam_by, base_of, temperature_of, info_by = stores
                probs_by[method] = probs(*tempered_moments(f_mu, f_var, temperature)).double()
                lam_by[method], base_of[method], temperature_of[method] = lam_of(post), "map", temperature
                val_p = probs(*tempered_moments(val_f_mu, val_f_var, temperature))
                info_by[method] = {
                    **info, **extra, "temperature": temperature, "validation_nll": flaplace.nll(val_p, val_labels),
                    "mean_logit_variance": float(f_var.diagonal(dim1=1, dim2=2).mean()) / temperature**2,
                }  # fmt: skip
                log(f"{regime}/{method}: lambda {lam_by[method]}, T {temperature:.4g}")

            if prior == "zero":  # issue 25: the evidence over (lambda, T), its validation refinement, online
                clock = time.perf_counter()
                hot, t_evidence, t_table, by_temperature = evidence_over_temperature(
                    model_fn, params, kfac_batches, seed=args.seed, refine_steps=args.refine_steps,
                    kfac_file=lambda t, tag=tag: None if cache_dir is None
                    else cache_dir / (f"{tag}_kfac.pt" if t == 1.0 else f"{tag}_kfac_T{t:.6g}.pt"),
                )  # fmt: skip
                extra = {"evidence_table": t_table, "search_s": time.perf_counter() - clock}
                # "soft": the best of T = 1, 2, 4, ... (the doubling steps the bracket takes upwards,
                # what the library's climb from T = 1 evaluates): the likelihood may only soften
                t_soft = max((t for t in by_temperature if t >= 1.0 and math.log2(t).is_integer()), key=lambda t: next(
                    r["log_evidence"] for r in t_table if r["temperature"] == t))  # fmt: skip
                t_fit = fit_guarded_climb(t_table)
                t_bic = fit_guarded_climb(t_table, price=math.log(n_train) / 2)
                for method, directions, t, post in (
                    ("evidence-temp", "all", t_evidence, hot),
                    ("evidence-temp-informed", "informed", t_evidence, hot),
                    ("evidence-temp-soft", "all", t_soft, by_temperature[t_soft]),
                    ("evidence-temp-soft-informed", "informed", t_soft, by_temperature[t_soft]),
                    ("evidence-temp-fit", "all", t_fit, by_temperature[t_fit]),
                    ("evidence-temp-fit-informed", "informed", t_fit, by_temperature[t_fit]),
                    ("evidence-temp-bic", "all", t_bic, by_temperature[t_bic]),
                    ("evidence-temp-bic-informed", "informed", t_bic, by_temperature[t_bic]),
                ):
                    f_var, val_var = (cached_covariance(post, c, directions) for c in (test_cache, val_cache))
                    add(method, f_mu, f_var, t, post, val_cache.logits, val_var, extra)
                for method, t, post in (
                    ("validation-temp", t_evidence, hot),
                    ("validation-temp-t1", 1.0, by_temperature[1.0]),
                ):
                    if method in probs_by:  # topping up a cached evaluation: these need the model
                        continue
                    clock = time.perf_counter()
                    fitted, t_val, val_history = tune_prior_temperature_nll(
                        post, model_fn, val_batches, temperature=t, progress=False
                    )
                    val_extra = {"start": {"lambda": lam_of(post), "temperature": t}, "fit_s": time.perf_counter() - clock,
                                 "fit_steps": len(val_history), "fit_validation_nll": min(h["nll"] for h in val_history)}  # fmt: skip
                    f_var, val_var = (cached_covariance(fitted, c) for c in (test_cache, val_cache))
                    add(method, f_mu, f_var, t_val, fitted, val_cache.logits, val_var, val_extra)

                def nll_at(candidate, cache=val_cache):  # what ships as default-val: the grid, informed
                    f_var = cached_covariance(candidate, cache, "informed")
                    return lambda temp: flaplace.nll(
                        probs(*tempered_moments(cache.logits, f_var, temp)), val_labels
                    )

                clock = time.perf_counter()
                fitted, t_val, grid_table = tune_prior_temperature_grid(
                    by_temperature[1.0], nll_at, progress=False
                )
                f_var, val_var = (cached_covariance(fitted, c, "informed") for c in (test_cache, val_cache))
                grid_extra = {"grid": grid_table, "fit_s": time.perf_counter() - clock}
                add("validation-temp-grid", f_mu, f_var, t_val, fitted, val_cache.logits, val_var, grid_extra)
                # what ships as default-val: that posterior averaged with temperature scaling by Akaike weights
                mixture = scaling_mixture(grid_table, len(val_labels))
                val_p = probs(*tempered_moments(val_cache.logits, val_var, t_val))
                method = "validation-temp-akaike"
                probs_by[method] = mix_with_scaling(probs_by["validation-temp-grid"], f_mu.double(), mixture)
                lam_by[method], base_of[method], temperature_of[method] = lam_of(fitted), "map", t_val
                info_by[method] = {
                    **info_by["validation-temp-grid"], "scaling_weight": mixture.weight, "scaling_temperature": mixture.temperature,
                    "validation_nll": flaplace.nll(mix_with_scaling(val_p.double(), val_cache.logits.double(), mixture), val_labels),
                }  # fmt: skip
                log(f"{regime}/{method}: weight {mixture.weight:.3f}, scaling T {mixture.temperature:.4g}")
                # the linearised model's evidence at its own mode, one Newton step from the MAP (Antoran et al.)
                grad_file = None if cache_dir is None else cache_dir / f"{tag}_grad.pt"
                gradient = cached(grad_file, summed_nll_gradient, model_fn, params, kfac_batches)
                lam_lin, step, lin_table = linearised_evidence(by_temperature[1.0], gradient)
                post_lin = flaplace.with_prior_precision(by_temperature[1.0], lam_lin)

                def moved(cache, step=step):  # the logits at the linear model's mode: f* + J step
                    return cache.logits + torch.cat([sum(torch.einsum("bc...,...->bc", jac[n], step[n]) for n in step) for jac in cache.jacobians])  # fmt: skip

                for method, directions in (("linearised-evidence", "all"), ("linearised-evidence-informed", "informed")):  # fmt: skip
                    f_var, val_var = (cached_covariance(post_lin, c, directions) for c in (test_cache, val_cache))  # fmt: skip
                    add(method, moved(test_cache), f_var, 1.0, post_lin, moved(val_cache), val_var, {"evidence_table": lin_table})  # fmt: skip
            del val_cache, test_cache
            if prior == "zero" and not args.no_online and set(trainable) == set(names):
                clock = time.perf_counter()
                online_file = None if cache_dir is None else cache_dir / f"{tag}_online_e{steps_per_epoch}.pt"
                o_params, o_history, o_best, o_state, lambdas = cached(
                    online_file, online_map, train_fn, model_fn, start, names, train_batches, val_batches,
                    validation_nll, steps=steps, lr=args.lr, precision=args.map_prior_precision, n_train=n_train,
                    every=steps_per_epoch, eval_every=args.eval_every if regime == "early" else steps_per_epoch,
                    keep=keep,
                )  # fmt: skip
                t_online = time.perf_counter() - clock
                o_params = {n: o_params[n] for n in names}
                o_post = online_posterior(o_state, o_params)
                jac_file = (
                    None if cache_dir is None else cache_dir / f"{tag}_n{len(test_labels)}_online_jac.pt"
                )
                o_val, o_test = cached(jac_file, jacobians_of, o_params)
                probs_by["online-map"], lam_by["online-map"], base_of["online-map"] = (
                    torch.softmax(o_test.logits.double(), -1), None, "map",
                )  # fmt: skip
                o_info = {**info, "map_steps": steps, "best_step": o_best, "history": o_history,
                          "online_lambdas": lambdas, "online_s": t_online}  # fmt: skip
                info_by["online-map"] = o_info
                for method, directions in (("online", "all"), ("online-informed", "informed")):
                    f_var, val_var = (cached_covariance(o_post, c, directions) for c in (o_test, o_val))
                    add(method, o_test.logits, f_var, 1.0, o_post, o_val.logits, val_var, o_info)
                del o_val, o_test
            if eval_file is not None:
                torch.save(
                    [
                        {k: v for k, v in store.items() if k not in before[id(store)]}
                        for store in (probs_by, lam_by, info_by, base_of, temperature_of)
                    ],
                    eval_file,
                )
        # the two defaults are copies of the rows chosen by --default and --default-val
        for alias, chosen in (("default", args.default), ("default-val", args.default_val)):
            if chosen in probs_by:
                for store in (probs_by, lam_by, base_of, temperature_of, info_by):
                    if chosen in store:
                        store[alias] = store[chosen]
        for method, p in probs_by.items():
            metrics = flaplace.classification_metrics(p, test_labels)
            record: dict[str, Any] = {
                "task": args.task if args.model == "smollm2" else f"{args.task} ({args.model})", "regime": regime, "method": method,
                "lambda": lam_by.get(method), "temperature": temperature_of.get(method), "nll": metrics["nll"], "ece": metrics["ece"],
                "accuracy": metrics["accuracy"], "brier": metrics["brier"],
            }  # fmt: skip
            base = base_of[method]
            for ref_name, ref in (("map", base), ("map0", "map"), ("temperature", "temperature")):
                if ref not in probs_by or ref == method:
                    continue
                found = stats.paired_bootstrap(p, probs_by[ref], test_labels, metrics=("nll", "ece"), seed=0)
                key = "map" if ref_name == "map" else ref_name
                record[f"nll_diff_vs_{key}"] = found["nll"]["diff"]
                record[f"nll_diff_vs_{key}_lo"], record[f"nll_diff_vs_{key}_hi"] = found["nll"]["ci95"]
                record[f"ece_diff_vs_{key}"] = found["ece"]["diff"]
            if method == base:
                record["nll_diff_vs_map"] = record["nll_diff_vs_map_lo"] = record["nll_diff_vs_map_hi"] = 0.0
            record["baseline_map"] = base
            record.update(
                {
                    "n_train": n_train, "n_val": len(val_labels), "n_test": len(test_labels), "link": "probit",
                    "lr": args.lr, "map_prior_precision": args.map_prior_precision,
                    "details": {k: v for k, v in info_by.get(method, {}).items() if k != "history"},
                    "map_history": info_by.get(method, {}).get("history"),
                }
            )  # fmt: skip
            records.append(record)
            log(
                f"{regime} {method}: NLL {metrics['nll']:.4f} ECE {metrics['ece']:.4f} acc {metrics['accuracy']:.3f} "
                f"vs MAP {record.get('nll_diff_vs_map', 0):+.4f} [{record.get('nll_diff_vs_map_lo', 0):+.4f}, "
                f"{record.get('nll_diff_vs_map_hi', 0):+.4f}]"
            )
        write_records(Path(args.out), [r for r in records if r["regime"] == regime])


def write_records(out: Path, records: list[dict[str, Any]]) -> None:
    """Replace the records of the same (task, regime, method) in ``out`` and keep the others."""
    existing = json.loads(out.read_text()) if out.exists() else []
    new = {(r["task"], r["regime"], r["method"]) for r in records}
    keep = [r for r in existing if (r["task"], r["regime"], r["method"]) not in new]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(keep + records, indent=1) + "\n")


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table of the records (docs/priors.md)."""
    lines = [
        "| task | regime | method | λ | T | NLL | ECE | accuracy | NLL − its MAP [95%] | NLL − temperature [95%] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lam, temperature = r["lambda"], r.get("temperature")
        lam_text = (
            ""
            if lam is None
            else (
                f"{lam:.3g}" if isinstance(lam, float) else ", ".join(f"{k} {v:.3g}" for k, v in lam.items())
            )
        )

        def interval(key: str, r=r) -> str:
            if f"nll_diff_vs_{key}" not in r:
                return ""
            return f"{r[f'nll_diff_vs_{key}']:+.3f} [{r[f'nll_diff_vs_{key}_lo']:+.3f}, {r[f'nll_diff_vs_{key}_hi']:+.3f}]"

        lines.append(
            f"| {r['task']} | {r['regime']} | {r['method']} | {lam_text} | "
            f"{'' if temperature is None else f'{temperature:.3g}'} | {r['nll']:.3f} | {r['ece']:.3f} "
            f"| {r['accuracy']:.3f} | {interval('map')} | {interval('temperature')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(table(json.loads(RESULTS.read_text())))
    elif sys.argv[1:2] == ["--bars"]:  # issue 25's check: --bars [default row] [default-val row]
        print(bars(json.loads(RESULTS.read_text()), *sys.argv[2:4]))
    else:
        main()
