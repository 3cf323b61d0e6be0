"""Load a finished run and predict on new data: ``flaplace predict`` and `predict_run`.

A run folder written by ``flaplace run`` holds what prediction needs: ``results.json`` (the
options, the task's classes), ``checkpoints/map.safetensors`` (the trained adapters and any
trained head) and ``posterior.safetensors`` (the posterior with its tuned prior precision).
`predict_run` rebuilds the model from them, reads the new inputs by the run's columns
(``--text-column``, ``--text-pair-column``, ``--choice-columns``) and returns, per input, the
Laplace predictive's class probabilities (with the run's ``--link`` and
``--predictive-directions``), the MAP's, and how uncertain the prediction is.

Examples:
    >>> from flaplace.app.predict import predict_run
    >>> rows = predict_run("outputs/run", "new.jsonl")  # doctest: +SKIP
    >>> rows[0]["prediction"], rows[0]["confidence"]  # doctest: +SKIP
    ('positive', 0.83)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file

from flaplace.app import hf, lora
from flaplace.app.checkpoints import write_json
from flaplace.app.config import RunConfig
from flaplace.app.stages import covariances, moments, run_probs
from flaplace.app.tasks.examples import Example, Task
from flaplace.app.tasks.prompts import multiple_choice_prompt
from flaplace.app.userdata import read_rows
from flaplace.metrics import classification_metrics
from flaplace.posterior_io import load_posterior
from flaplace.predictive import Directions

__all__ = ["PREDICTIONS_FILE", "predict_run"]

#: The file `predict_run` writes into the run folder when no ``output`` is given.
PREDICTIONS_FILE = "predictions.jsonl"

Data = str | os.PathLike[str] | Sequence[str] | Sequence[Mapping[str, Any]]


def _read_run(run_dir: Path) -> dict[str, Any]:
    results_file = run_dir / "results.json"
    for needed in (
        results_file,
        run_dir / "posterior.safetensors",
        run_dir / "checkpoints" / "map.safetensors",
    ):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} not found: {run_dir} is not a finished run folder (flaplace run writes it)"
            )
    return json.loads(results_file.read_text(encoding="utf-8"))


def _records(data: Data, config: RunConfig) -> list[Mapping[str, Any]]:
    if isinstance(data, str | os.PathLike):
        return [record for _, record in read_rows(data)[0]]
    rows = list(data)
    if not rows:
        raise ValueError("predict_run got no inputs")
    records: list[Mapping[str, Any]] = []
    for row in rows:
        records.append({config.text_column: row} if isinstance(row, str) else cast(Mapping[str, Any], row))
    return records


def _label_index(value: Any, choices: Sequence[str]) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if text in choices:
        return list(choices).index(text)
    if text.upper() in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)] and len(text) == 1:
        return "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(text.upper())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(choices):
        return int(text)
    raise ValueError(f"label {value!r} is not one of the run's classes {list(choices)}")


def _example(record: Mapping[str, Any], config: RunConfig, choices: Sequence[str], where: str) -> Example:
    def column(name: str) -> str:
        if record.get(name) is None:
            raise ValueError(f"{where}: no column {name!r}; the input has: {', '.join(record)}")
        return str(record[name]).strip()

    text = column(config.text_column)
    pair = None if config.text_pair_column is None else column(config.text_pair_column)
    if config.choice_columns is not None:  # a multiple-choice run of the user's own data
        names = list(config.choice_columns)
        options = record.get(names[0]) if len(names) == 1 else [column(n) for n in names]
        if not isinstance(options, list) or len(options) != len(choices):
            raise ValueError(f"{where}: expected {len(choices)} options in {', '.join(names)}")
        text = multiple_choice_prompt(text, [str(o) for o in options])
    label = _label_index(record.get(config.label_column), choices)
    return Example(text, tuple(choices), 0 if label is None else label, pair)


def predict_run(
    run_dir: str | os.PathLike[str],
    data: Data,
    *,
    output: str | os.PathLike[str] | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Predict new inputs with a finished run's posterior; write and return one row per input.

    Args:
        run_dir: the run's ``--output-dir`` (it holds ``results.json``, ``posterior.safetensors``
            and ``checkpoints/map.safetensors``).
        data: a ``.jsonl``/``.csv``/``.tsv`` file with the run's text column (and text-pair or
            choice columns, if the run had them), a list of such records (dicts), or a list of
            texts. A label column, when every row has one, adds the metrics to the result.
        output: the JSONL file to write (default: ``<run_dir>/predictions.jsonl``).
        device: where to compute (default: the run's ``--device``).
        batch_size: inputs per batch (default: the run's ``--eval-batch-size``).
        progress: show progress bars.

    Returns:
        One dict per input: ``prediction`` (the most probable class), ``confidence`` (its
        probability), ``probs`` (class -> Laplace predictive probability, as the run's
        ``laplace`` metrics computed it: `flaplace.app.stages.run_probs`), ``map_probs``
        (the MAP's), ``entropy`` (of ``probs``, in nats), ``logit_std`` (the predictive
        standard deviation of each class's logit over the run's temperature) and ``label``
        when the input had one.

    Raises:
        FileNotFoundError: the folder is not a finished run. ValueError: an input without the
            run's columns, or a label outside its classes.

    Examples:
        >>> rows = predict_run("outputs/run", ["a fine film", "a dull meal"])  # doctest: +SKIP
        >>> sorted(rows[0])  # doctest: +SKIP
        ['confidence', 'entropy', 'logit_std', 'map_probs', 'prediction', 'probs']
    """
    folder = Path(run_dir)
    results = _read_run(folder)
    config = RunConfig(**results["config"])
    device = device or config.device
    choices = tuple(results["task"]["choices"])
    records = _records(data, config)
    examples = [_example(r, config, choices, f"input {i}") for i, r in enumerate(records)]
    labelled = all(r.get(config.label_column) is not None for r in records)
    answers = tuple(results["task"].get("answers", ()))  # a causal LM's words, where not the classes
    kind = results["task"]["kind"]
    task = Task(config.task, kind, len(choices), {"test": examples}, choices=choices, answers=answers)
    loaded = hf.load_model(
        config.model, n_classes=len(choices), kind=results["model_kind"], dtype=config.dtype, device=device
    )
    model = lora.attach_lora(
        loaded, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets,
        last_layers=config.lora_layers,
    ).to(device)  # fmt: skip
    laplace_names = lora.laplace_param_names(model)
    trainable = lora.trainable_param_names(model)
    trained = load_file(str(folder / "checkpoints" / "map.safetensors"), device=device)
    if set(trained) != set(trainable):
        raise ValueError(f"{folder}/checkpoints/map.safetensors does not match the run's model")
    model.eval().requires_grad_(False)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            named[name].copy_(value)
    posterior = load_posterior(
        folder / "posterior.safetensors", {n: named[n].detach() for n in laplace_names}
    )
    laplace_fn = hf.model_function(model, laplace_names, loaded, task)
    encoded = hf.encode_batches(
        examples, loaded, task, batch_size=batch_size or config.eval_batch_size,
        max_length=config.max_length, device=device,
    )  # fmt: skip
    f_mu, jacobians = moments(laplace_fn, posterior, encoded, progress=progress, desc="predict")
    directions = cast(Directions, results.get("predictive_directions", config.predictive_directions))
    f_var = covariances(posterior, jacobians, directions)
    probs = run_probs(
        f_mu, f_var, results, link=config.link, n_samples=config.n_samples, seed=config.seed
    ).cpu()
    map_probs = torch.softmax(f_mu.double(), dim=-1).cpu()
    t = float(results.get("temperature", 1.0))  # the std of the predictive's logits, f / T
    std = (f_var.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt() / t).cpu()
    rows = []
    for i, example in enumerate(examples):
        p = probs[i]
        top = int(p.argmax())
        row: dict[str, Any] = {
            "prediction": choices[top],
            "confidence": float(p[top]),
            "probs": dict(zip(choices, p.tolist(), strict=True)),
            "map_probs": dict(zip(choices, map_probs[i].tolist(), strict=True)),
            "entropy": -sum(q * math.log(q) for q in p.tolist() if q > 0),
            "logit_std": dict(zip(choices, std[i].tolist(), strict=True)),
        }
        if labelled:
            row["label"] = choices[example.label]
        rows.append(row)
    target = Path(output) if output is not None else folder / PREDICTIONS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    if labelled:
        labels = torch.tensor([ex.label for ex in examples])
        write_json(
            target.with_suffix(".metrics.json"),
            {
                "map": classification_metrics(map_probs, labels),
                "laplace": classification_metrics(probs, labels),
            },
        )
    return rows
