"""flaplace.app.config and the command line built from it: one declaration of every option."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_hf import TARGETS, save_tiny_model, write_demo_files

from flaplace.app import cli, config, hf
from flaplace.app.tasks import KNOWN_TASKS

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config")
    return {"model": save_tiny_model("gpt2", root / "gpt2"), "data": write_demo_files(root / "demo")}


def small_args(setup, out: Path) -> list[str]:
    return [
        "run", "--model", str(setup["model"]), "--task", "demo", "--data-path", str(setup["data"]),
        "--lora-rank", "2", "--lora-targets", ",".join(TARGETS["gpt2"]), "--steps", "3", "--batch-size", "4",
        "--max-length", "32", "--lr-threshold", "12", "--n-kfac", "4", "--output-dir", str(out), "--quiet",
    ]  # fmt: skip


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["run", "demo"])
def test_help_shows_every_default_and_the_tasks(command, capsys):
    text = help_text(command, capsys)
    defaults = cli.DEMO_DEFAULTS if command == "demo" else {}
    for field in config.OPTIONS:
        option = "--" + field.name.replace("_", "-")
        shown = config.show(defaults.get(field.name, field.default))
        assert re.search(re.escape(option) + r" .*?\(default: " + re.escape(shown) + r"\)", text), option
    for task in KNOWN_TASKS:
        assert task in text


def test_docs_table_of_options_is_the_declared_defaults():
    page = (DOCS / "cli.md").read_text()
    assert config.options_markdown() in page


def test_parser_checks_and_keys_come_from_the_one_declaration():
    parser_options = {
        a.dest
        for sub in ("run", "demo")
        for a in cli.build_parser()._subparsers._group_actions[0].choices[sub]._actions
    }
    assert {f.name for f in config.OPTIONS} <= parser_options
    keyed = {name for names in config.STAGE_FIELDS.values() for name in names}
    assert keyed == {f.name for f in config.OPTIONS if f.metadata["stage"] is not None}
    for field in config.OPTIONS:
        if field.metadata["choices"]:
            with pytest.raises(ValueError, match=f"{field.name} must be one of"):
                config.check_option(field.name, "no-such-choice")


def test_none_is_spelled_none_on_the_command_line_and_in_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr_threshold = "none"\nmax-train = "null"\n')
    assert config.parse_option("lr_threshold", "None") is None
    args = cli.build_parser().parse_args(["run", "--model", "m", "--config", str(toml)])
    made = cli.config_from_args(args)
    assert made.lr_threshold is None and made.max_train is None
    args = cli.build_parser().parse_args(["run", "--model", "m", "--lr-threshold", "none"])
    assert cli.config_from_args(args).lr_threshold is None


def test_every_dtype_choice_is_a_torch_dtype():
    for name in config.DTYPES:
        assert isinstance(hf.parse_dtype(name), torch.dtype)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--dtype", "float16"])


@pytest.mark.parametrize(
    ("device", "message"),
    [("nonsense", "device must be a torch device"), ("cuda", "CUDA is not available")],
)
def test_bad_or_missing_device_is_one_line(setup, tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main([*small_args(setup, tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_local_model_folder_is_reported_as_such(setup, tmp_path, capsys):
    args = small_args(setup, tmp_path)
    args[args.index("--model") + 1] = str(tmp_path / "no" / "model")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "model folder not found" in err and "Repo id" not in err


def test_a_resumed_run_says_which_stages_it_reused(setup, tmp_path, capsys):
    assert cli.main(small_args(setup, tmp_path)) == 0
    assert "reused checkpoints: none" in capsys.readouterr().out
    assert cli.main([*small_args(setup, tmp_path), "--link", "mc", "--fisher", "exact"]) == 0
    assert "reused checkpoints: map; computed: kfac, prior, predictive" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stages"] == {
        "map": "loaded",
        "kfac": "computed",
        "prior": "computed",
        "predictive": "computed",
    }
