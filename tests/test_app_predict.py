"""A newcomer's path through the command line: default LoRA targets per architecture, a run
without matplotlib, and ``flaplace predict`` on a finished run (tiny Llama, offline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import review, save_tiny_model

from flaplace.app import cli, lora
from flaplace.app.predict import predict_run
from flaplace.app.stages import link_probs


def write_reviews(path: Path, n: int, start: int = 0) -> Path:
    rows = [
        {"text": review(i, (i * 7) % 2), "label": ("negative", "positive")[(i * 7) % 2]}
        for i in range(start, start + n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> dict[str, Path]:
    """``flaplace run --model <tiny llama> --data-path my.jsonl`` with every other option at its default
    (but for the number of steps and the output folder), with matplotlib unimportable."""
    root = tmp_path_factory.mktemp("newcomer")
    model = save_tiny_model("llama", root / "llama")
    data = write_reviews(root / "my.jsonl", 36)
    test = write_reviews(root / "test.jsonl", 6, start=100)
    out = root / "run"
    argv = ["run", "--model", str(model), "--data-path", str(data), "--test-path", str(test)]
    argv += ["--steps", "10", "--output-dir", str(out), "--quiet"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
        with pytest.warns(UserWarning, match="matplotlib"):
            status = cli.main(argv)
    assert status == 0
    return {"model": model, "data": data, "test": test, "out": out}


def test_run_with_default_options_on_a_llama_folder_and_no_matplotlib(finished_run):
    out = finished_run["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["task"] == "user" and results["config"]["lora_targets"] is None
    # PEFT's default targets for Llama: q_proj and v_proj, in every block
    names = results["posterior"]["names"]
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert results["predictive_directions"] == "informed" and results["informed_directions"] > 0
    assert (out / "posterior.safetensors").is_file()
    assert not (out / "reliability.png").exists()  # skipped, with a warning


def test_predict_on_the_test_file_reproduces_the_runs_predictive(finished_run, tmp_path):
    out = finished_run["out"]
    target = tmp_path / "predictions.jsonl"
    assert cli.main(["predict", str(out), str(finished_run["test"]), "--output", str(target), "--quiet"]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 6 and all(r["label"] in ("negative", "positive") for r in rows)
    # the run stored the test split's logit moments: the same inputs must give the same probabilities,
    # those of the logits over the run's T, averaged with temperature scaling (default-val's weight)
    saved = load_file(str(out / "checkpoints" / "predictive.safetensors"))
    results = json.loads((out / "results.json").read_text())
    t, tuning = results["temperature"], results["prior_tuning"]
    assert tuning["method"] == "default-val" and 0 < tuning["scaling_weight"] < 1
    posterior_part = link_probs(saved["f_mu"] / t, saved["f_var"] / t**2, link="probit", n_samples=1, seed=0)
    scaled = torch.softmax(saved["f_mu"].double() / tuning["scaling_temperature"], -1)
    expected = tuning["scaling_weight"] * posterior_part + (1 - tuning["scaling_weight"]) * scaled
    got = torch.tensor([[r["probs"]["negative"], r["probs"]["positive"]] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    map_probs = torch.tensor([[r["map_probs"]["negative"], r["map_probs"]["positive"]] for r in rows])
    torch.testing.assert_close(
        map_probs.double(), torch.softmax(saved["f_mu"].double(), -1), atol=1e-5, rtol=0
    )
    std = torch.tensor([[r["logit_std"]["negative"], r["logit_std"]["positive"]] for r in rows])
    torch.testing.assert_close(
        std.double(), saved["f_var"].diagonal(dim1=-2, dim2=-1).sqrt().double() / t, atol=1e-5, rtol=1e-4
    )
    assert bool((std > 0).all())  # the test compares a real variance, not the MAP alone
    metrics = json.loads(target.with_suffix(".metrics.json").read_text())
    assert set(metrics) == {"map", "laplace"}
    assert metrics["laplace"]["nll"] == pytest.approx(results["metrics"]["laplace"]["nll"], abs=1e-5)


def test_predict_run_takes_plain_texts_without_labels(finished_run):
    rows = predict_run(finished_run["out"], ["the film was great .", "the meal was awful ."])
    assert len(rows) == 2 and "label" not in rows[0]
    for row in rows:
        assert sum(row["probs"].values()) == pytest.approx(1.0)
        assert row["prediction"] in ("negative", "positive") and row["confidence"] >= 0.5
    assert (finished_run["out"] / "predictions.jsonl").is_file()


def test_predict_needs_a_finished_run(tmp_path, capsys):
    assert cli.main(["predict", str(tmp_path), "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "not a finished run folder" in err and "Traceback" not in err


def test_unknown_architecture_and_wrong_targets_are_one_line_errors_listing_linear_layers(tmp_path):
    from flaplace.app.hf import load_model

    loaded = load_model(save_tiny_model("llama", tmp_path / "llama"), n_classes=2)
    assert lora.default_targets(loaded.model) == ["q_proj", "v_proj"]
    loaded.model.config.model_type = "no-such-architecture"
    with pytest.raises(ValueError, match="no default LoRA targets") as err:
        lora.attach_lora(loaded, rank=2, alpha=4.0)
    assert "q_proj" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="match no linear layer") as err:
        lora.attach_lora(loaded, rank=2, alpha=4.0, targets=["query"])
    assert "q_proj" in str(err.value) and "\n" not in str(err.value)
