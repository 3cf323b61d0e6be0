"""The end-to-end Laplace-LoRA pipeline behind ``flaplace run`` and ``flaplace demo``.

Stages, each resumable from a checkpoint in ``<output_dir>/checkpoints``:

1. ``map``: MAP fine-tuning of the adapters (and of a new classification head) in a
   plain training loop on the functional API. The objective per step is

       mean NLL of the batch + lambda / (2 N) * ||theta||^2

   with ``N`` the number of training examples and ``lambda`` the prior precision
   (``prior_precision``), i.e. the MAP objective ``-log p(D | theta) - log p(theta)``
   divided by ``N``. The L2 term is written into the loss explicitly and
   ``torch.optim.AdamW`` runs with ``weight_decay=0``: AdamW's decoupled decay is
   rescaled by Adam's preconditioner and is not the gradient of a Gaussian prior, so
   it would not give the MAP that the Laplace approximation expands around. The
   prior covers exactly the weights of the posterior (LoRA matrices and the head's
   weight); a head bias is trained without a prior and is not part of the posterior.
2. ``kfac``: the training-set log-likelihood (summed) and the K-FAC factors at the MAP.
3. ``prior``: the prior precision, tuned by the Laplace evidence (``evidence``) or by
   the validation NLL of the linearised predictive on a grid (``grid``).
4. ``predictive``: ``f_mu`` and ``f_var = J Sigma J^T`` on the test split.

A stage is reused when its checkpoint's key (a hash of the configuration fields it
depends on) matches; otherwise it and every later stage are recomputed. Every file
is written to a temporary name and renamed into place, and the final outputs
(``results.json``, ``reliability.png``, ``posterior.safetensors``) are deleted when a
run starts, so a run that fails leaves nothing that looks like a finished result.
``results.json`` is written last.

Example:
    >>> from flaplace.workflow import RunConfig, run
    >>> results = run(RunConfig(model="path/to/minilm", task="demo", output_dir="outputs/demo"))
    >>> results["metrics"]["laplace"]["nll"] < results["metrics"]["map"]["nll"]
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

import flaplace
from flaplace import hf
from flaplace.evidence import log_marginal_likelihood, tune_prior_evidence, tune_prior_grid
from flaplace.kfac import fit as fit_kfac
from flaplace.links import predictive_probs
from flaplace.metrics import classification_metrics
from flaplace.posterior import load_posterior, make_posterior, save_posterior
from flaplace.predictive import (
    _jacobians_and_logits,
    predictive_covariance,
    predictive_precompute,
)
from flaplace.tasks import Example, Task, batches, load_task
from flaplace.typing import ModelFn, Params, Posterior

STAGES: tuple[str, ...] = ("map", "kfac", "prior", "predictive")
FINAL_OUTPUTS: tuple[str, ...] = ("results.json", "reliability.png", "posterior.safetensors")
PRIOR_TUNINGS: tuple[str, ...] = ("evidence", "grid")
LINKS: tuple[str, ...] = ("probit", "mc", "bridge")

#: How per-example Jacobians of token-level weights are computed (see flaplace.predictive).
JACOBIAN_METHOD: Final = "capture"


@dataclasses.dataclass
class RunConfig:
    """Everything a run depends on. Field names are the command line's option names.

    ``max_eval`` caps both the validation and the test split; ``prior_precision`` is
    the prior of the MAP objective and the starting point of prior tuning.

    Example:
        >>> RunConfig(model="gpt2", task="arc_easy", lora_targets=("c_attn",), steps=500)
    """

    model: str = ""
    model_kind: str = "auto"
    task: str = "demo"
    data_path: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    eval_batch_size: int = 32
    max_length: int = 128
    max_train: int | None = None
    max_eval: int | None = None
    fisher: str = "mc"
    sharing: str = "expand"
    n_kfac: int = 10
    lr_threshold: int | None = 100
    prior_precision: float = 1.0
    prior_tuning: str = "evidence"
    link: str = "probit"
    n_samples: int = 1000
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    output_dir: str = "outputs/run"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        check_config(self)


#: Configuration fields each stage depends on (a stage also depends on all earlier ones).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "map": (
        "model", "model_kind", "task", "data_path", "lora_rank", "lora_alpha", "lora_targets", "steps", "lr",
        "batch_size", "max_length", "max_train", "prior_precision", "dtype", "seed",
    ),
    "kfac": ("fisher", "sharing", "n_kfac", "lr_threshold", "eval_batch_size"),
    "prior": ("prior_tuning", "max_eval"),
    "predictive": (),
}  # fmt: skip


def check_config(config: RunConfig) -> None:
    """Raise ``ValueError`` for a configuration value that cannot work (before any work is done).

    Example:
        >>> check_config(RunConfig(model="m", link="probit"))
    """
    choices = {
        "prior_tuning": PRIOR_TUNINGS,
        "link": LINKS,
        "fisher": ("mc", "exact", "empirical"),
        "sharing": ("expand", "reduce", "last"),
        "model_kind": hf.MODEL_KINDS,
        "dtype": ("float32", "float64", "bfloat16", "float16"),
    }
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {getattr(config, key)!r}")
    positive = ("lora_rank", "steps", "batch_size", "eval_batch_size", "max_length", "n_kfac", "n_samples")
    for key in positive:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    for key in ("max_train", "max_eval", "lr_threshold", "threads"):
        value = getattr(config, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
    for key in ("lr", "lora_alpha", "prior_precision"):
        value = getattr(config, key)
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a positive number, got {value!r}")


def stage_key(config: RunConfig, stage: str) -> str:
    """A hash of the configuration fields that ``stage`` and the stages before it depend on.

    Example:
        >>> stage_key(RunConfig(model="m"), "map") == stage_key(RunConfig(model="m", link="mc"), "map")
        True
    """
    fields: dict[str, Any] = {}
    for name in STAGES[: STAGES.index(stage) + 1]:
        fields.update({key: getattr(config, key) for key in STAGE_FIELDS[name]})
    if stage in ("prior", "predictive") and config.prior_tuning == "grid":
        fields["link"] = config.link  # the grid scores the predictive through the link
    text = json.dumps(fields, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    Example:
        >>> with atomic_path(Path("out/results.json")) as tmp:
        ...     tmp.write_text("{}")
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically.

    Example:
        >>> write_json(Path("out/x.json"), {"a": 1})
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _read_marker(path: Path, key: str) -> dict[str, Any] | None:
    """The stage record at ``path`` when it exists and carries ``key``, else ``None``."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


# --------------------------------------------------------------------------- helpers


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _encoded(
    examples: Sequence[Example], loaded: hf.LoadedModel, task: Task, config: RunConfig, batch_size: int
) -> list[dict[str, Tensor]]:
    return [
        hf.encode(chunk, loaded, task, max_length=config.max_length, device=config.device)
        for chunk in batches(examples, batch_size)
    ]


def _training_batches(
    examples: Sequence[Example], loaded, task, config: RunConfig
) -> Iterator[dict[str, Tensor]]:
    """Shuffled minibatches forever, reshuffled every epoch (seeded)."""
    epoch = 0
    while True:
        for chunk in batches(examples, config.batch_size, shuffle=True, seed=config.seed * 1_000_003 + epoch):
            yield hf.encode(chunk, loaded, task, max_length=config.max_length, device=config.device)
        epoch += 1


def _moments(
    model_fn: flaplace.ModelFunction,
    posterior: Posterior,
    encoded: Sequence[dict[str, Tensor]],
    progress: bool,
    desc: str,
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """MAP logits of every batch and the per-batch Jacobians (kept for re-use with other priors).

    The capture method covers the adapters (used at every token) and a classification head
    (used once per example, on pooled features) in the same forward pass.
    """
    logits, jacobians = [], []
    for batch in tqdm(encoded, desc=desc, disable=not progress, unit="batch"):
        jac, f_mu = _jacobians_and_logits(
            model_fn, posterior.mean, batch, chunk_size=None, method=JACOBIAN_METHOD
        )
        logits.append(f_mu.detach())
        jacobians.append({n: j.detach() for n, j in jac.items()})
    return torch.cat(logits), jacobians


def _covariances(posterior: Posterior, jacobians: Sequence[dict[str, Tensor]]) -> Tensor:
    cache = predictive_precompute(posterior)
    return torch.cat([predictive_covariance(cache, jac) for jac in jacobians]).detach()


def _probs(f_mu: Tensor, f_var: Tensor, config: RunConfig) -> Tensor:
    generator = torch.Generator(device=f_mu.device).manual_seed(config.seed)
    probs = predictive_probs(
        f_mu.double(),
        f_var.double(),
        link=cast(Any, config.link),
        n_samples=config.n_samples,
        generator=generator,
    )
    return probs.detach()


def default_threads() -> int:
    """Intra-op threads when none are given: one per core, or 1 on a machine already busy.

    With more runnable threads than cores, PyTorch's OpenMP workers spin-wait on each
    other and a step can get ten times slower than on one thread; on an idle machine
    all cores are used.

    Example:
        >>> default_threads() >= 1
        True
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except OSError:  # pragma: no cover - platforms without load averages
        busy = False
    return 1 if busy else cores


def versions() -> dict[str, str]:
    """Versions of the software a run used.

    Example:
        >>> versions()["torch"]
        '2.13.0+cpu'
    """
    out = {"python": platform.python_version(), "flaplace": flaplace.__version__, "torch": torch.__version__}
    for module in ("transformers", "peft", "tokenizers"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = "not installed"
    return out


# --------------------------------------------------------------------------- stages


def train_map(
    model_fn: ModelFn,
    params: Params,
    laplace_names: Sequence[str],
    data: Iterator[dict[str, Tensor]],
    *,
    n_train: int,
    steps: int,
    lr: float,
    prior_precision: float,
    progress: bool = True,
) -> tuple[Params, list[float]]:
    """MAP fine-tuning: AdamW on ``mean NLL + prior_precision / (2 n_train) * ||theta||^2``.

    ``theta`` are the weights named ``laplace_names`` (the posterior's blocks); other
    entries of ``params`` (e.g. a head bias) are trained without a prior. The learning
    rate decays linearly to zero. Works on leaf copies of ``params``.

    Returns:
        ``(trained params, loss per step)``.

    Example:
        >>> trained, losses = train_map(f, params, names, loader_iter, n_train=500, steps=200,
        ...                             lr=1e-3, prior_precision=1.0)
    """
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    optimizer = torch.optim.AdamW(leaves.values(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    scale = prior_precision / (2 * n_train)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="MAP fine-tuning", disable=not progress, unit="step")
    for _ in bar:
        batch = next(data)
        logits = model_fn(leaves, batch)
        nll = F.cross_entropy(logits.float(), batch["labels"])
        penalty = sum(leaves[n].float().square().sum() for n in laplace_names)
        loss = nll + scale * penalty
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is not finite ({float(loss)}); lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(nll.item())
        bar.set_postfix(nll=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return {n: p.detach() for n, p in leaves.items()}, losses


def fit_factors(
    model_fn: flaplace.ModelFunction,
    params: Params,
    encoded: Sequence[dict[str, Tensor]],
    config: RunConfig,
    progress: bool = True,
) -> tuple[flaplace.Factors, float]:
    """K-FAC factors of the posterior's weights and the summed training log-likelihood.

    One pass over the data: adapters used at every token and a classification head used
    once per example (on pooled features) are captured in the same forward.

    Example:
        >>> factors, ll = fit_factors(model_fn, map_params, train_batches, config)
    """
    factors, state = fit_kfac(
        model_fn,
        params,
        encoded,
        progress=progress,
        return_state=True,
        fisher=config.fisher,
        sharing=config.sharing,
        n_kfac=config.n_kfac,
        lr_threshold=config.lr_threshold,
        generator=torch.Generator(device=config.device).manual_seed(config.seed),
    )
    return cast(flaplace.Factors, factors), float(cast(flaplace.KFACState, state).log_likelihood)


# --------------------------------------------------------------------------- the pipeline


def run(config: RunConfig, *, progress: bool = True, task: Task | None = None) -> dict[str, Any]:
    """Run the whole pipeline; return (and write) the results.

    Args:
        config: the run's configuration.
        progress: progress bars and stage messages on stderr.
        task: an in-memory :class:`~flaplace.tasks.Task` to use instead of loading
            ``config.task`` (its name should still be given as ``config.task``).

    Returns:
        The content of ``results.json``.

    Raises:
        ValueError, FileNotFoundError: bad configuration, data or model (before any
            result is written).

    Example:
        >>> results = run(RunConfig(model=minilm_dir, task="demo", output_dir="outputs/demo"))
        >>> print(format_table(results))
    """
    check_config(config)
    torch.set_num_threads(config.threads or default_threads())
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    for name in FINAL_OUTPUTS:  # a failed run must not leave an older result behind
        (out / name).unlink(missing_ok=True)
    timings: dict[str, float] = {}
    stages: dict[str, str] = {}
    started = time.perf_counter()

    tick = time.perf_counter()
    if task is None:
        task = load_task(
            config.task,
            config.data_path,
            max_examples={"train": config.max_train, "validation": config.max_eval, "test": config.max_eval},
            seed=config.seed,
        )
    _seed_everything(config.seed)
    loaded = hf.load_model(
        config.model,
        n_classes=task.n_classes,
        kind=config.model_kind,
        dtype=config.dtype,
        device=config.device,
    )
    if loaded.kind == "causal":
        hf.answer_token_ids(loaded.tokenizer, task.choices)  # fails early, naming the answer
    model = hf.attach_lora(
        loaded, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets
    )
    model.to(config.device)
    laplace_names = hf.laplace_param_names(model)
    trainable = hf.trainable_param_names(model)
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

    # 1. MAP
    tick = time.perf_counter()
    key = stage_key(config, "map")
    record = _read_marker(checkpoints / "map.json", key)
    map_file = checkpoints / "map.safetensors"
    if record is not None and map_file.is_file():
        trained = load_file(str(map_file), device=config.device)
        if set(trained) != set(trainable):
            raise ValueError(f"{map_file} does not hold the model's trainable weights; delete {checkpoints}")
        losses = record["losses"]
        stages["map"] = "loaded"
    else:
        model.train()
        trained, losses = train_map(
            model_fn,
            {n: named[n] for n in trainable},
            laplace_names,
            _training_batches(train, loaded, task, config),
            n_train=len(train),
            steps=config.steps,
            lr=config.lr,
            prior_precision=config.prior_precision,
            progress=progress,
        )
        model.eval()
        with atomic_path(map_file) as tmp:
            save_file({n: t.contiguous() for n, t in trained.items()}, str(tmp))
        write_json(
            checkpoints / "map.json", {"key": key, "losses": losses, "seconds": time.perf_counter() - tick}
        )
        stages["map"] = "computed"
    model.eval()
    with torch.no_grad():
        for name, value in trained.items():
            named[name].copy_(value)
    # From here on weights are only read (the functional stages pass detached copies). A model
    # weight that still required grad (e.g. a head bias) would make every K-FAC statistic part
    # of an autograd graph that grows with each batch.
    model.requires_grad_(False)
    map_params = {n: named[n].detach() for n in laplace_names}
    laplace_fn = hf.model_function(model, laplace_names, loaded, task)
    timings["map"] = time.perf_counter() - tick

    # 2. training log-likelihood and K-FAC factors
    tick = time.perf_counter()
    key = stage_key(config, "kfac")
    record = _read_marker(checkpoints / "kfac.json", key)
    kfac_file = checkpoints / "kfac.safetensors"
    if record is not None and kfac_file.is_file():
        unit = load_posterior(kfac_file, map_params)
        factors, log_likelihood = unit.factors, float(record["log_likelihood"])
        stages["kfac"] = "loaded"
    else:
        train_batches = _encoded(train, loaded, task, config, config.eval_batch_size)
        factors, log_likelihood = fit_factors(laplace_fn, map_params, train_batches, config, progress)
        with atomic_path(kfac_file) as tmp:
            save_posterior(tmp, make_posterior(factors, map_params, 1.0))
        write_json(
            checkpoints / "kfac.json",
            {"key": key, "log_likelihood": log_likelihood, "seconds": time.perf_counter() - tick},
        )
        stages["kfac"] = "computed"
    posterior = make_posterior(factors, map_params, config.prior_precision)
    timings["kfac"] = time.perf_counter() - tick

    # 3. prior precision
    tick = time.perf_counter()
    key = stage_key(config, "prior")
    record = _read_marker(checkpoints / "prior.json", key)
    if record is not None:
        tuned_precision = float(record["prior_precision"])
        tuning_record = record["tuning"]
        stages["prior"] = "loaded"
    else:
        if config.prior_tuning == "evidence":
            tuned, history = tune_prior_evidence(posterior, log_likelihood, progress=progress)
            tuning_record = {"method": "evidence", "steps": len(history) - 1, "final": history[-1]}
        else:
            validation = task.split("validation")
            labels = torch.tensor([ex.label for ex in validation])
            val_batches = _encoded(validation, loaded, task, config, config.eval_batch_size)
            f_mu, jacobians = _moments(laplace_fn, posterior, val_batches, progress, "validation Jacobians")

            def validation_nll(candidate: Posterior) -> float:
                probs = _probs(f_mu, _covariances(candidate, jacobians), config)
                return classification_metrics(probs, labels)["nll"]

            tuned, table = tune_prior_grid(posterior, validation_nll, progress=progress)
            tuning_record = {"method": "grid", "table": table}
        tuned_precision = float(next(iter(tuned.prior_precision.values())))
        write_json(
            checkpoints / "prior.json",
            {
                "key": key,
                "prior_precision": tuned_precision,
                "tuning": tuning_record,
                "seconds": time.perf_counter() - tick,
            },
        )
        stages["prior"] = "computed"
    posterior = make_posterior(factors, map_params, tuned_precision)
    log_evidence = float(log_marginal_likelihood(posterior, log_likelihood).detach())
    timings["prior"] = time.perf_counter() - tick

    # 4. linearised predictive on the test split
    tick = time.perf_counter()
    key = stage_key(config, "predictive")
    record = _read_marker(checkpoints / "predictive.json", key)
    predictive_file = checkpoints / "predictive.safetensors"
    test = task.split("test")
    if record is not None and predictive_file.is_file():
        saved = load_file(str(predictive_file))
        f_mu, f_var, labels = saved["f_mu"], saved["f_var"], saved["labels"]
        stages["predictive"] = "loaded"
    else:
        labels = torch.tensor([ex.label for ex in test])
        test_batches = _encoded(test, loaded, task, config, config.eval_batch_size)
        f_mu, jacobians = _moments(laplace_fn, posterior, test_batches, progress, "test predictive")
        f_var = _covariances(posterior, jacobians)
        with atomic_path(predictive_file) as tmp:
            save_file({"f_mu": f_mu.contiguous(), "f_var": f_var.contiguous(), "labels": labels}, str(tmp))
        write_json(checkpoints / "predictive.json", {"key": key, "seconds": time.perf_counter() - tick})
        stages["predictive"] = "computed"
    timings["predictive"] = time.perf_counter() - tick

    # outputs: metrics, table, posterior, reliability diagram, results.json (last)
    map_probs = torch.softmax(f_mu.double(), dim=-1)
    laplace_probs = _probs(f_mu, f_var, config)
    metrics = {
        "map": classification_metrics(map_probs, labels),
        "laplace": classification_metrics(laplace_probs, labels),
    }
    with atomic_path(out / "posterior.safetensors") as tmp:
        save_posterior(tmp, posterior)
    from flaplace.plots import reliability_diagram

    with atomic_path(out / "reliability.png") as tmp:
        reliability_diagram(
            {"MAP": map_probs, f"Laplace ({config.link})": laplace_probs},
            labels,
            tmp,
            title=f"{task.name} test split ({len(test)} examples)",
        )
    timings["total"] = time.perf_counter() - started
    results = {
        "config": dataclasses.asdict(config),
        "task": {
            "name": task.name,
            "kind": task.kind,
            "choices": list(task.choices),
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
        "log_evidence": log_evidence,
        "train_log_likelihood": log_likelihood,
        "final_train_nll": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "stages": stages,
        "timings_s": timings,
        "stage_seconds_when_computed": {
            stage: _stage_seconds(checkpoints / f"{stage}.json") for stage in STAGES
        },
        "versions": versions(),
    }
    write_json(out / "results.json", results)
    return results


def _stage_seconds(marker: Path) -> float | None:
    """How long a stage took when its checkpoint was computed (possibly by an earlier run)."""
    try:
        return float(json.loads(marker.read_text(encoding="utf-8"))["seconds"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def format_table(results: dict[str, Any]) -> str:
    """The MAP vs Laplace table of a run's results, as fixed-width text.

    Example:
        >>> print(format_table(results))
        method       accuracy     NLL     ECE   Brier
        MAP            0.9150  0.2611  0.0533  0.1389
        ...
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

    Example:
        >>> print(format_markdown(results))
    """
    lines = ["| method | accuracy | NLL | ECE | Brier |", "|---|---|---|---|---|"]
    for label, key in (("MAP", "map"), (f"Laplace ({results['config']['link']})", "laplace")):
        m = results["metrics"][key]
        lines.append(
            f"| {label} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} | {m['brier']:.4f} |"
        )
    return "\n".join(lines)
