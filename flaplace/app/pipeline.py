"""The end-to-end Laplace-LoRA pipeline behind ``flaplace run`` and ``flaplace demo``.

Stages, each resumable from a checkpoint in ``<output_dir>/checkpoints``
(see [`checkpoints`][flaplace.app.checkpoints] and [`stages`][flaplace.app.stages]):

1. ``map``: MAP fine-tuning of the adapters (and of a new classification head).
2. ``kfac``: the training-set log-likelihood (summed) and the K-FAC factors at the MAP.
3. ``prior``: the prior precision, tuned by the Laplace evidence (``evidence``) or by
   the validation NLL of the linearised predictive on a grid (``grid``).
4. ``predictive``: ``f_mu`` and ``f_var = J Sigma J^T`` on the test split.

A stage is reused when its checkpoint's key (a hash of the options it depends on)
matches; otherwise it and every later stage are recomputed. The final outputs
(``results.json``, ``reliability.png``, ``posterior.safetensors``) are deleted when a
run starts. The posterior and ``results.json`` are written as soon as the predictive is done,
before any optional output: a run that fails earlier leaves nothing that looks like a finished
result, and a missing optional package (matplotlib, for the reliability diagram) only skips
that output, with a warning.

[`run`][flaplace.app.pipeline.run] changes no process-wide state: it seeds the random-number
generators with ``transformers.set_seed`` inside [`seeded`][flaplace.app.pipeline.seeded], which
restores their states afterwards, and leaves the thread count to its caller (the command line).

Called on every rank of an initialised ``torch.distributed`` process group (e.g. under
``torchrun``, see [`distributed`][flaplace.app.distributed]), the stages split their work over
the ranks and give every rank the same result; only rank 0 writes files and shows progress.

Examples:
    >>> from flaplace.app.config import RunConfig
    >>> from flaplace.app.pipeline import run
    >>> results = run(RunConfig(model="path/to/minilm", task="demo", output_dir="outputs/demo"))  # doctest: +SKIP
    >>> results["metrics"]["laplace"]["nll"] < results["metrics"]["map"]["nll"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from flaplace.app import hf, lora
from flaplace.app.checkpoints import (
    StageCache,
    atomic_path,
    remove_stale_temporaries,
    stage_seconds,
    write_json,
)
from flaplace.app.config import STAGES, RunConfig, check_config, check_device, stage_key, user_spec
from flaplace.app.distributed import (
    RankStages,
    check_same_config,
    current_ranks,
    gather,
    rank_device,
    rank_seeded,
    shard,
)
from flaplace.app.report import FINAL_OUTPUTS, versions
from flaplace.app.stages import (
    covariances,
    fit_factors,
    link_probs,
    map_logits,
    moments,
    run_probs,
    soften_factors,
    train_map,
    training_batches,
    tune_prior,
)
from flaplace.app.tasks import Task, batches, load_task
from flaplace.evidence import log_marginal_likelihood
from flaplace.metrics import classification_metrics
from flaplace.posterior import load_posterior, make_posterior, save_posterior
from flaplace.predictive import Directions, informed_directions
from flaplace.temperature import fit_temperature


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the generators for the block with ``transformers.set_seed``, then restore their states.

    ``transformers.set_seed`` seeds Python's, NumPy's and torch's (CPU and CUDA) generators, the
    same call a Hugging Face ``Trainer`` makes. It leaves the process seeded, which a library
    function must not do, so the states are saved before and restored after the block (torch's
    by ``torch.random.fork_rng``).

    Examples:
        >>> with seeded(0):
        ...     first = torch.rand(1)
        >>> with seeded(0):
        ...     bool(torch.rand(1) == first)
        True
    """
    import numpy as np
    from transformers import set_seed

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            set_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))


def run(config: RunConfig, *, progress: bool = True, task: Task | None = None) -> dict[str, Any]:
    """Run the whole pipeline; return (and write) the results.

    Args:
        config: the run's configuration.
        progress: progress bars and stage messages on stderr.
        task: an in-memory [`Task`][flaplace.app.tasks.examples.Task] to use instead of loading
            ``config.task`` (its name should still be given as ``config.task``).

    Returns:
        The content of ``results.json``; its ``"stages"`` says which stages were loaded.

    Raises:
        ValueError, FileNotFoundError: bad configuration, device, data or model (before any
            result is written).

    Examples:
        >>> results = run(RunConfig(model=minilm_dir, task="demo", output_dir="outputs/demo"))  # doctest: +SKIP
    """
    check_config(config)
    ranks = current_ranks()
    many = ranks.world > 1
    if many:  # each rank on its own device; every rank must have been given the same options
        config = dataclasses.replace(config, device=rank_device(config.device, ranks))
        check_same_config(
            {k: v for k, v in dataclasses.asdict(config).items() if k not in ("device", "threads")}
        )
        progress = progress and ranks.main
    check_device(config.device)
    out = Path(config.output_dir)
    if ranks.main:
        for name in FINAL_OUTPUTS:  # a failed run must not leave an older result behind
            (out / name).unlink(missing_ok=True)
        remove_stale_temporaries(out)
    cache: StageCache | RankStages = (
        RankStages(out / "checkpoints", ranks, config.device) if many else StageCache(out / "checkpoints")
    )
    timings: dict[str, float] = {}
    started = tick = time.perf_counter()
    if task is None:
        limits = {"train": config.max_train, "validation": config.max_eval, "test": config.max_eval}
        task = load_task(
            config.task, config.data_path, max_examples=limits, seed=config.seed, user=user_spec(config)
        )
    with seeded(config.seed):
        loaded = hf.load_model(
            config.model,
            n_classes=task.n_classes,
            kind=config.model_kind,
            dtype=config.dtype,
            device=config.device,
        )
        if loaded.kind == "causal":
            hf.answer_token_ids(loaded.tokenizer, task.answer_words)  # fails early, naming the answer
        model = lora.attach_lora(
            loaded, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets,
            last_layers=config.lora_layers,
        )  # fmt: skip
        model.to(config.device)
        laplace_names = lora.laplace_param_names(model)
        # the prior's centre: the adapters as initialised (seeded), or zero
        prior_mean = (
            {n: p.detach().clone() for n, p in model.named_parameters() if n in set(laplace_names)}
            if config.prior_mean == "init"
            else None
        )
        trainable = lora.trainable_param_names(model)
        model_fn = hf.model_function(model, trainable, loaded, task)
        named = dict(model.named_parameters())
        train = task.split("train")
        timings["load"] = time.perf_counter() - tick
        _log(
            f"task {task.name}: {len(train)} train / {len(task.split('validation'))} validation / "
            f"{len(task.split('test'))} test; model kind {loaded.kind}; "
            f"{sum(named[n].numel() for n in laplace_names)} weights in the posterior ({len(laplace_names)} blocks)",
            progress,
        )

        def encoded(split: str, share: bool = False) -> list[dict[str, torch.Tensor]]:
            """The split's batches; ``share``: this rank's contiguous share of them."""
            if not (share and many):
                return hf.encode_batches(
                    task.split(split), loaded, task, batch_size=config.eval_batch_size,
                    max_length=config.max_length, device=config.device,
                )  # fmt: skip
            chunks = shard(
                list(batches(task.split(split), config.eval_batch_size)), ranks, f"{split} batches"
            )
            return [
                hf.encode(chunk, loaded, task, max_length=config.max_length, device=config.device)
                for chunk in chunks
            ]

        # 1. MAP
        tick = time.perf_counter()

        def compute_map() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            model.train()
            data = training_batches(
                train, loaded, task, batch_size=config.batch_size, max_length=config.max_length,
                seed=config.seed, device=config.device,
            )  # fmt: skip
            with rank_seeded(config.seed, ranks, config.device):  # dropout masks differ between ranks
                trained, losses = train_map(  # dropout as configured: train through f.training()
                    model_fn.training(), {n: named[n] for n in trainable}, laplace_names, data,
                    n_train=len(train), steps=config.steps, lr=config.lr,
                    prior_precision=config.prior_precision, progress=progress, prior_mean=prior_mean,
                    distributed=many,
                )  # fmt: skip
            model.eval()
            return trained, {"losses": losses}

        def load_map(path: Path) -> dict[str, torch.Tensor]:
            trained = load_file(str(path), device=config.device)
            if set(trained) != set(trainable):
                raise ValueError(f"{path} does not hold the model's trainable weights; delete {cache.folder}")
            return trained

        trained, map_record = cache.get(
            "map", stage_key(config, "map"), compute_map, save=_save_tensors, load=load_map
        )
        losses = map_record["losses"]
        model.eval()
        with torch.no_grad():
            for name, value in trained.items():
                named[name].copy_(value)
        # From here on weights are only read (the functional stages pass detached copies). A model
        # weight that still required grad (e.g. a head bias) would make every K-FAC statistic part
        # of an autograd graph that grows with each batch. The pipeline owns this model.
        model.requires_grad_(False)
        map_params = {n: named[n].detach() for n in laplace_names}
        laplace_fn = hf.model_function(model, laplace_names, loaded, task)
        timings["map"] = time.perf_counter() - tick

        # 2. training log-likelihood and K-FAC factors
        tick = time.perf_counter()

        kfac_options: dict[str, Any] = {"fisher": config.fisher, "sharing": config.sharing, "n_kfac": config.n_kfac,
                                        "lr_threshold": config.lr_threshold, "seed": config.seed,
                                        "device": config.device, "progress": progress, "distributed": many}  # fmt: skip
        factor_io: dict[str, Any] = {
            "save": lambda path, factors: save_posterior(path, make_posterior(factors, map_params, 1.0)),
            "load": lambda path: load_posterior(path, map_params).factors,
        }

        def compute_kfac() -> tuple[Any, dict[str, Any]]:
            factors, ll = fit_factors(laplace_fn, map_params, encoded("train", share=True), **kfac_options)
            return factors, {"log_likelihood": ll}

        factors, kfac_record = cache.get("kfac", stage_key(config, "kfac"), compute_kfac, **factor_io)
        log_likelihood = float(kfac_record["log_likelihood"])
        posterior = make_posterior(factors, map_params, config.prior_precision, prior_mean=prior_mean)
        timings["kfac"] = time.perf_counter() - tick

        # 3. prior precision
        tick = time.perf_counter()
        directions = cast(Directions, config.predictive_directions)  # checked by check_config

        def probs(f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
            return link_probs(f_mu, f_var, link=config.link, n_samples=config.n_samples, seed=config.seed)

        def validation_labels(data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
            if many:  # this rank's share
                return torch.cat([batch["labels"] for batch in data]).cpu()
            return torch.tensor([ex.label for ex in task.split("validation")])

        scored: dict[str, Any] = {}  # the validation moments, computed at most once

        def validation() -> tuple[Any, torch.Tensor]:
            if not scored:
                data = encoded("validation", share=True)
                scored["moments"] = moments(laplace_fn, posterior, data, progress=progress, desc="validation")
                scored["labels"] = validation_labels(data)
            return scored["moments"], scored["labels"]

        def temperature_scaling() -> tuple[float | None, dict[str, float] | None]:
            """Temperature scaling of the MAP and the MAP's metrics on the validation split (None without one)."""
            if not task.split("validation"):
                return None, None
            if scored:
                val_mu, val_labels = scored["moments"].logits, scored["labels"]
            else:
                data = encoded("validation", share=True)
                val_mu, val_labels = map_logits(laplace_fn, map_params, data), validation_labels(data)
            if many:  # every rank's share
                parts = gather((val_mu, val_labels), config.device)
                val_mu, val_labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            val_metrics = classification_metrics(torch.softmax(val_mu.double(), -1), val_labels)
            return fit_temperature(val_mu, val_labels), val_metrics

        softening = config.prior_tuning == "default"  # lambda and T >= 1 by the evidence: K-FAC per T

        def compute_prior() -> tuple[Any, dict[str, Any]]:
            softened = None
            if softening:
                train = encoded("train", share=True)
                softened, precision, record = soften_factors(laplace_fn, map_params, train, posterior, log_likelihood, **kfac_options)  # fmt: skip
            else:
                precision, record = tune_prior(
                    posterior, log_likelihood, method=config.prior_tuning, validation=validation, probs=probs,
                    progress=progress, distributed=many, directions=directions,
                )  # fmt: skip
            scaling, val_metrics = temperature_scaling()
            return softened, {"prior_precision": precision, "tuning": record, "temperature_scaling": scaling,
                              "validation_map": val_metrics}  # fmt: skip

        softened, prior_record = cache.get(
            "prior", stage_key(config, "prior"), compute_prior, **(factor_io if softening else {})
        )
        tuned_precision, tuning_record = float(prior_record["prior_precision"]), prior_record["tuning"]
        if softening:  # the posterior of the tempered likelihood
            factors, log_likelihood = softened, float(tuning_record["log_likelihood"])
        temperature = float(tuning_record.get("temperature", 1.0))  # of the posterior's likelihood
        scaling_temperature = prior_record.get("temperature_scaling")
        posterior = make_posterior(factors, map_params, tuned_precision, prior_mean=prior_mean)
        log_evidence = float(log_marginal_likelihood(posterior, log_likelihood).detach())
        timings["prior"] = time.perf_counter() - tick

        # 4. linearised predictive on the test split
        tick = time.perf_counter()
        test = task.split("test")

        def compute_predictive() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            f_mu, jacobians = moments(
                laplace_fn, posterior, encoded("test", share=True), progress=progress, desc="test predictive"
            )
            f_var = covariances(posterior, jacobians, directions)
            if many:  # every rank's share, in order
                parts = gather((f_mu, f_var), config.device)
                f_mu, f_var = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            labels = torch.tensor([ex.label for ex in test])
            return {"f_mu": f_mu, "f_var": f_var, "labels": labels}, {}

        saved, _ = cache.get(
            "predictive", stage_key(config, "predictive"), compute_predictive, save=_save_tensors,
            load=lambda path: load_file(str(path)),
        )  # fmt: skip
        f_mu, f_var, labels = saved["f_mu"], saved["f_var"], saved["labels"]
        timings["predictive"] = time.perf_counter() - tick
    _log(f"stages: {', '.join(f'{s} {how}' for s, how in cache.status.items())}", progress)

    n_informed = sum(informed_directions(posterior).values())
    if directions == "informed" and n_informed == 0:
        warnings.warn(
            f"no direction of the posterior is informed by the data (every s_i a_j <= lambda = "
            f"{tuned_precision:.3g}): the informed predictive equals the MAP. More training data, or "
            "--predictive-directions all (the whole posterior), gives it a variance.",
            stacklevel=2,
        )

    # outputs: metrics; then posterior and results.json; then the optional reliability diagram
    map_probs = torch.softmax(f_mu.double(), dim=-1)
    laplace_probs = run_probs(f_mu, f_var, {"temperature": temperature, "prior_tuning": tuning_record},
                              link=config.link, n_samples=config.n_samples, seed=config.seed)  # fmt: skip
    metrics = {
        "map": classification_metrics(map_probs, labels),
        "laplace": classification_metrics(laplace_probs, labels),
    }
    if scaling_temperature is not None:  # the MAP's logits over T fitted on validation: a baseline
        metrics["temperature"] = classification_metrics(torch.softmax(f_mu.double() / scaling_temperature, -1), labels)  # fmt: skip
    timings["total"] = time.perf_counter() - started
    results = {
        "config": dataclasses.asdict(config),
        "task": {
            "name": task.name,
            "kind": task.kind,
            "choices": list(task.choices),
            "answers": list(task.answers),
            "n_examples": {split: len(task.split(split)) for split in ("train", "validation", "test")},
            "source": task.source,
        },
        "model_kind": loaded.kind,
        "posterior": {
            "blocks": len(laplace_names),
            "weights": sum(p.numel() for p in map_params.values()),
            "names": laplace_names,
        },
        "metrics": metrics,
        "prior_precision": tuned_precision,
        "prior_tuning": tuning_record,
        "temperature": temperature,
        "temperature_scaling": scaling_temperature,
        "validation_map_metrics": prior_record.get("validation_map"),
        "predictive_directions": directions,
        "informed_directions": n_informed,
        "log_evidence": log_evidence,
        "train_log_likelihood": log_likelihood,
        "final_train_nll": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "stages": dict(cache.status),
        "timings_s": timings,
        "stage_seconds_when_computed": {stage: stage_seconds(cache.marker(stage)) for stage in STAGES},
        "versions": versions(),
        "processes": ranks.world,
    }
    if ranks.main:  # the other ranks hold the same results and write nothing
        with atomic_path(out / "posterior.safetensors") as tmp:
            save_posterior(tmp, posterior)
        write_json(out / "results.json", results)
        # optional outputs come after the results, so that nothing is lost when one fails
        _reliability_plot(
            out / "reliability.png",
            {"MAP": map_probs, f"Laplace ({config.link})": laplace_probs},
            labels,
            title=f"{task.name} test split ({len(test)} examples)",
        )
    return results


def _reliability_plot(
    path: Path, probs: dict[str, torch.Tensor], labels: torch.Tensor, *, title: str
) -> bool:
    """Write the reliability diagram; without matplotlib, warn and skip it. Returns whether it was written."""
    from flaplace.app.plots import reliability_diagram

    try:
        with atomic_path(path) as tmp:
            reliability_diagram(probs, labels, tmp, title=title)
    except ImportError as err:
        warnings.warn(
            f"{err}; skipped {path.name} (results.json and the posterior are written)", stacklevel=2
        )
        return False
    return True
