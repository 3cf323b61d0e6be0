"""The run configuration: every option of ``flaplace run``, declared once.

Each field of [`RunConfig`][flaplace.app.config.RunConfig] carries its metadata (help text,
kind, choices, the stage whose checkpoint depends on it). The command line's parser
([`build_parser`][flaplace.app.cli.build_parser]), the TOML reader
([`coerce_option`][flaplace.app.config.coerce_option]), the checks
([`check_config`][flaplace.app.config.check_config]) and the checkpoint keys
([`stage_key`][flaplace.app.config.stage_key]) are all derived from it, so a new option is
one new field.

Examples:
    >>> from flaplace.app.config import RunConfig, stage_key
    >>> config = RunConfig(model="gpt2", task="arc_easy", lora_targets=("c_attn",), steps=500)
    >>> stage_key(config, "map") == stage_key(RunConfig(model="gpt2", task="arc_easy",
    ...     lora_targets=("c_attn",), steps=500, link="mc"), "map")
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch

from flaplace.app.hf import MODEL_KINDS
from flaplace.app.tasks import KNOWN_TASKS, USER_TASK, UserSpec
from flaplace.links import Link
from flaplace.predictive import DIRECTIONS
from flaplace.temperature import TEMPERATURE_LIMITS
from flaplace.typing import FisherType, Sharing

#: The stages of a run, in order; each is stored in its own checkpoint.
STAGES: tuple[str, ...] = ("map", "kfac", "prior", "predictive")
#: How the prior precision is tuned.
PRIOR_TUNINGS: tuple[str, ...] = ("default-val", "default", "evidence", "grid")
#: Where the Gaussian prior is centred: at zero, or at the adapters' initialisation.
PRIOR_MEANS: tuple[str, ...] = ("zero", "init")
#: The links from logit moments to class probabilities.
LINKS: tuple[str, ...] = get_args(Link)
#: Parameter dtypes a run can load the model in.
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16")
#: Spellings of ``None`` for an optional option (command line and TOML).
NONE_WORDS: tuple[str, ...] = ("none", "null")

#: How an option's text is read: the value types of the command line and TOML.
OptionKind = Literal["str", "optional_str", "int", "optional_int", "float", "names", "optional_names"]


def option(
    default: Any,
    help: str,
    *,
    kind: OptionKind = "str",
    stage: str | None = None,
    choices: tuple[str, ...] | None = None,
    positive: bool = False,
) -> Any:
    """Declare one run option: a dataclass field whose metadata drives the parser and checks.

    Args:
        default: the value when neither a config file nor the command line gives one.
        help: one line for ``--help``.
        kind: how the value is read and checked (``optional_*`` also accept ``none``).
        stage: the first stage whose checkpoint depends on the option (``None``: none does).
        choices: the allowed values.
        positive: numbers must be positive (integers at least 1).

    Examples:
        >>> field = option(8, "LoRA rank", kind="int", stage="map", positive=True)
        >>> field.metadata["stage"]
        'map'
    """
    meta = {"help": help, "kind": kind, "stage": stage, "choices": choices, "positive": positive}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunConfig:
    """Everything a run depends on. Field names are the command line's option names.

    Examples:
        >>> RunConfig(model="gpt2", lora_targets=("c_attn",)).lora_targets
        ('c_attn',)
    """

    model: str = option(
        "", "Hugging Face hub id, local model folder, GGUF file or folder, or smollm2", stage="map"
    )
    model_kind: str = option("auto", "how the model scores answers", stage="map", choices=MODEL_KINDS)
    task: str = option("demo", f"task name, one of: {', '.join(KNOWN_TASKS)}", stage="map")
    data_path: str | None = option(
        None,
        "folder with the task's files (else $FLAPLACE_DATA_DIR/<task>); "
        f"or your own data (task {USER_TASK}): a .jsonl/.csv/.tsv training file or a folder "
        "written by datasets' save_to_disk",
        kind="optional_str",
        stage="map",
    )
    validation_path: str | None = option(
        None,
        f"task {USER_TASK}: validation file (none: carve a tenth of --data-path)",
        kind="optional_str",
        stage="map",
    )
    test_path: str | None = option(
        None,
        f"task {USER_TASK}: test file (none: carve a tenth of --data-path)",
        kind="optional_str",
        stage="map",
    )
    text_column: str = option("text", f"task {USER_TASK}: column of the text or question", stage="map")
    text_pair_column: str | None = option(
        None,
        f"task {USER_TASK}: column of a second text (none: single texts)",
        kind="optional_str",
        stage="map",
    )
    label_column: str = option("label", f"task {USER_TASK}: column of the label", stage="map")
    choice_columns: tuple[str, ...] | None = option(
        None,
        f"task {USER_TASK}, multiple choice: a column holding the list of options, or one column "
        "per option (e.g. A,B,C,D); none: classification",
        kind="optional_names",
        stage="map",
    )
    classes: tuple[str, ...] | None = option(
        None,
        f"task {USER_TASK}, classification: class names in index order (none: the sorted labels)",
        kind="optional_names",
        stage="map",
    )
    lora_rank: int = option(8, "LoRA rank", kind="int", stage="map", positive=True)
    lora_alpha: float = option(
        16.0, "LoRA alpha (scale alpha / rank)", kind="float", stage="map", positive=True
    )
    lora_targets: tuple[str, ...] | None = option(
        None,
        "comma-separated linear layers to adapt, e.g. q_proj,v_proj (none: PEFT's default for "
        "the model's architecture)",
        kind="optional_names",
        stage="map",
    )
    lora_layers: int | None = option(
        None,
        "LoRA only in the last N transformer blocks (none: all)",
        kind="optional_int",
        stage="map",
        positive=True,
    )
    steps: int = option(200, "MAP training steps", kind="int", stage="map", positive=True)
    lr: float = option(
        1e-3, "AdamW learning rate (decays linearly to 0)", kind="float", stage="map", positive=True
    )
    batch_size: int = option(16, "training batch size", kind="int", stage="map", positive=True)
    eval_batch_size: int = option(
        32, "batch size of K-FAC and the predictive", kind="int", stage="kfac", positive=True
    )
    max_length: int = option(128, "maximum tokens per example", kind="int", stage="map", positive=True)
    max_train: int | None = option(
        None, "cap on training examples (none: all)", kind="optional_int", stage="map", positive=True
    )
    max_eval: int | None = option(
        None,
        "cap on validation and test examples (none: all)",
        kind="optional_int",
        stage="prior",
        positive=True,
    )
    fisher: str = option("mc", "Fisher of the K-FAC factors", stage="kfac", choices=get_args(FisherType))
    sharing: str = option(
        "expand", "K-FAC for weights shared over tokens", stage="kfac", choices=get_args(Sharing)
    )
    n_kfac: int = option(10, "eigenpairs kept by low-rank factors", kind="int", stage="kfac", positive=True)
    lr_threshold: int | None = option(
        100,
        "factor side from which it is low rank (none: all dense)",
        kind="optional_int",
        stage="kfac",
        positive=True,
    )
    prior_precision: float = option(
        1.0, "prior precision of the MAP objective; start of tuning", kind="float", stage="map", positive=True
    )
    prior_mean: str = option(
        "zero",
        "centre of the prior (and of the MAP's L2 term): zero, or init (the adapters at initialisation)",
        stage="map",
        choices=PRIOR_MEANS,
    )
    prior_tuning: str = option(
        "default-val",
        "how the prior precision (and a likelihood temperature) is tuned: default-val (both on "
        "validation NLL, averaged with temperature scaling by Akaike weights), default (both by the evidence; T >= 1 where it raises the training fit by over ln(N)/2), "
        "evidence (T = 1), or grid (validation NLL, T = 1)",
        stage="prior",
        choices=PRIOR_TUNINGS,
    )
    predictive_directions: str = option(
        "informed",
        "covariance of the predictive: informed (only where the data outweigh the prior) or all",
        stage="prior",
        choices=DIRECTIONS,
    )
    link: str = option("probit", "link from logit moments to probabilities", choices=LINKS)
    n_samples: int = option(1000, "samples of the mc link", kind="int", positive=True)
    device: str = option("cpu", "torch device (cpu, cuda, cuda:1, mps)")
    dtype: str = option("float32", "parameter dtype of the model", stage="map", choices=DTYPES)
    seed: int = option(0, "seed of LoRA init, data order and sampling", kind="int", stage="map")
    output_dir: str = option("outputs/run", "folder for results and checkpoints")
    threads: int | None = option(
        None, "torch threads (none: cores, or 1 on a busy machine)", kind="optional_int", positive=True
    )

    def __post_init__(self) -> None:
        for name in ("lora_targets", "choice_columns", "classes"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        check_config(self)


#: The options that describe a user's own files (task ``user``); other tasks reject them.
USER_OPTIONS: tuple[str, ...] = (
    "validation_path", "test_path", "text_column", "text_pair_column", "label_column", "choice_columns", "classes",
)  # fmt: skip

#: The declared options, in order.
OPTIONS: tuple[dataclasses.Field, ...] = dataclasses.fields(RunConfig)
#: Configuration fields each stage depends on (a stage also depends on all earlier ones).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    stage: tuple(f.name for f in OPTIONS if f.metadata["stage"] == stage) for stage in STAGES
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_option(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming option ``name`` when ``value`` cannot work.

    Examples:
        >>> check_option("steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: steps must be a positive integer, got 0
    """
    meta = RunConfig.__dataclass_fields__[name].metadata
    kind, choices = meta["kind"], meta["choices"]
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if kind == "int" and meta["positive"] and not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if kind == "int" and not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if kind == "optional_int" and value is not None and not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if kind == "float" and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if name == "device":
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda:0', got {value!r}"
            ) from None


def check_config(config: RunConfig) -> None:
    """Raise ``ValueError`` for a configuration value that cannot work (before any work is done).

    Examples:
        >>> check_config(RunConfig(model="m", link="probit"))
    """
    for field in OPTIONS:
        check_option(field.name, getattr(config, field.name))
    if config.task != USER_TASK:
        for name in USER_OPTIONS:
            if getattr(config, name) != RunConfig.__dataclass_fields__[name].default:
                raise ValueError(
                    f"{name} is read only for your own data (task {USER_TASK}), but the task is "
                    f"{config.task!r}; give --data-path <file or datasets save_to_disk folder> and leave "
                    f"out --task, or drop {name}"
                )


def check_device(device: str) -> None:
    """Raise ``ValueError`` when ``device`` does not exist on this machine.

    Examples:
        >>> check_device("cpu")
    """
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
    if kind == "cuda" and torch.device(device).index is not None:
        count = torch.cuda.device_count()
        if torch.device(device).index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use --device cpu")


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names as a tuple.

    Examples:
        >>> names("query, value")
        ('query', 'value')
    """
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_option(name: str, text: str) -> Any:
    """The value of option ``name`` from its command-line text (not yet checked).

    Examples:
        >>> parse_option("lr_threshold", "none") is None
        True
        >>> parse_option("lora_targets", "q_proj,v_proj")
        ('q_proj', 'v_proj')
    """
    kind = RunConfig.__dataclass_fields__[name].metadata["kind"]
    if kind.startswith("optional_") and text.strip().lower() in (*NONE_WORDS, ""):
        return None
    readers: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "names": names}
    return readers.get(kind.removeprefix("optional_"), str)(text)


def coerce_option(name: str, value: Any) -> Any:
    """A TOML value of option ``name`` in the field's type: ``"none"`` for ``None``, ints as floats.

    Examples:
        >>> coerce_option("lr_threshold", "none") is None
        True
        >>> coerce_option("lora_alpha", 3)
        3.0
    """
    kind = RunConfig.__dataclass_fields__[name].metadata["kind"]
    if isinstance(value, str) and kind.startswith("optional_") and value.strip().lower() in NONE_WORDS:
        return None
    if kind in ("names", "optional_names") and value is not None:
        return names(value) if isinstance(value, str) else tuple(value)
    if kind == "float" and _is_int(value):
        return float(value)
    return value


def user_spec(config: RunConfig) -> UserSpec:
    """The columns and files of task ``user`` from the run's options.

    Examples:
        >>> user_spec(RunConfig(model="m", task="user", label_column="stars")).label
        'stars'
    """
    return UserSpec(
        text=config.text_column,
        label=config.label_column,
        text_pair=config.text_pair_column,
        choices=config.choice_columns,
        classes=config.classes,
        validation_path=config.validation_path,
        test_path=config.test_path,
    )


def stage_key(config: RunConfig, stage: str) -> str:
    """A hash of the configuration fields that ``stage`` and the stages before it depend on.

    With ``prior_tuning="grid"`` or ``"default-val"`` the prior (and so every later stage) also
    depends on the link, since the validation NLL scores the predictive through it.

    Examples:
        >>> stage_key(RunConfig(model="m"), "map") == stage_key(RunConfig(model="m", link="mc"), "map")
        True
    """
    fields: dict[str, Any] = {}
    for name in STAGES[: STAGES.index(stage) + 1]:
        fields.update({key: getattr(config, key) for key in STAGE_FIELDS[name]})
    if stage in ("prior", "predictive") and config.prior_tuning in ("grid", "default-val"):
        fields["link"] = config.link
    if stage in ("prior", "predictive") and config.prior_tuning == "default-val":
        fields["rule"] = "akaike-mixture"  # since 2026-12-06: a prior stored before holds no weight
    if stage in ("prior", "predictive"):  # since 2026-12-06: temperatures searched past 16 (and 100)
        fields["temperature_limits"] = list(TEMPERATURE_LIMITS)
    text = json.dumps(fields, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def options_markdown(defaults: dict[str, Any] | None = None) -> str:
    """The options and their defaults as a Markdown table (the docs' table is checked against it).

    Examples:
        >>> print(options_markdown().splitlines()[2])
        | `--model` | `""` | Hugging Face hub id, local model folder, GGUF file or folder, or smollm2 |
    """
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for field in OPTIONS:
        value = (defaults or {}).get(field.name, field.default)
        lines.append(f"| `--{field.name.replace('_', '-')}` | `{show(value)}` | {field.metadata['help']} |")
    return "\n".join(lines)


def show(value: Any) -> str:
    """An option value as it is written on the command line.

    Examples:
        >>> show(("query", "value")), show(None), show(""), show(0.001)
        ('query,value', 'none', '""', '0.001')
    """
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(value)
    if value == "":
        return '""'
    return str(value)
