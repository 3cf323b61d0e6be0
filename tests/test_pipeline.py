"""The end-to-end pipeline on tiny random Hugging Face models and tiny task files (offline, seconds)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_hf import TARGETS, save_tiny_model, write_arc_files, write_demo_files

from flaplace.app import checkpoints, hf, lora, report, stages
from flaplace.app import config as config_module
from flaplace.app.config import RunConfig
from flaplace.app.pipeline import run
from flaplace.app.tasks import Example, Task, TaskDataError
from flaplace.evidence import log_marginal_likelihood
from flaplace.jacobians import per_example_jacobians
from flaplace.posterior_io import load_posterior


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workflow")


@pytest.fixture(scope="module")
def data(root) -> dict[str, Path]:
    return {"demo": write_demo_files(root / "demo"), "arc_easy": write_arc_files(root / "arc_easy")}


@pytest.fixture(scope="module")
def models(root) -> dict[str, Path]:
    return {arch: save_tiny_model(arch, root / f"model_{arch}") for arch in ("llama", "gpt2", "bert")}


def config(models, data, arch: str, task: str, out: Path, **overrides) -> RunConfig:
    options = {
        "model": str(models[arch]),
        "task": task,
        "data_path": str(data[task]),
        "lora_rank": 2,
        "lora_alpha": 4.0,
        "lora_targets": TARGETS[arch],
        "steps": 6,
        "lr": 1e-2,
        "batch_size": 4,
        "eval_batch_size": 8,
        "max_length": 48,
        "lr_threshold": 12,
        "n_kfac": 4,
        "output_dir": str(out),
    }
    options.update(overrides)
    return RunConfig(**options)


@pytest.mark.parametrize(
    ("arch", "task", "kind"),
    [
        ("llama", "arc_easy", "causal"),
        ("gpt2", "arc_easy", "causal"),
        ("gpt2", "demo", "causal"),
        ("bert", "demo", "seq_cls"),
        ("bert", "arc_easy", "seq_cls"),
    ],
)
def test_pipeline_end_to_end(models, data, tmp_path, arch, task, kind):
    results = run(config(models, data, arch, task, tmp_path), progress=False)
    n_classes = 4 if task == "arc_easy" else 2
    assert results["model_kind"] == kind
    assert results["stages"] == dict.fromkeys(config_module.STAGES, "computed")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["metrics"] == results["metrics"]
    for method in ("map", "laplace"):
        m = results["metrics"][method]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1 and 0 <= m["brier"] <= 2
        assert math.isfinite(m["nll"]) and m["nll"] > 0
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"torch", "transformers", "peft", "flaplace"} <= set(results["versions"])
    # the saved posterior reloads onto the model's adapter weights
    loaded = hf.load_model(models[arch], n_classes=n_classes)
    model = lora.attach_lora(loaded, rank=2, alpha=4.0, targets=TARGETS[arch])
    names = lora.laplace_param_names(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    posterior = load_posterior(tmp_path / "posterior.safetensors", params)
    assert list(posterior.mean) == names == results["posterior"]["names"]
    if kind == "seq_cls":
        assert any("classifier.modules_to_save" in n for n in names)  # the new head is in the posterior
    lam = float(next(iter(posterior.prior_precision.values())))
    assert lam == pytest.approx(results["prior_precision"])
    # reported evidence = the evidence of the saved posterior with the saved training log-likelihood
    recomputed = float(log_marginal_likelihood(posterior, results["train_log_likelihood"]).detach())
    assert recomputed == pytest.approx(results["log_evidence"], rel=1e-5)
    # the Laplace predictive is not the MAP one: it has a positive logit variance
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "predictive.safetensors"))
    assert saved["f_mu"].shape == (8, n_classes)
    variances = saved["f_var"].diagonal(dim1=-2, dim2=-1)
    assert bool((variances >= 0).all())
    # the default predictive keeps the directions with s_i a_j > lambda, counted here by hand
    assert results["predictive_directions"] == "informed"
    counted = sum(
        int(((f.S.values[:, None] * f.A.values[None, :]) > lam).sum()) for f in posterior.factors.values()
    )
    assert results["informed_directions"] == counted
    assert (float(variances.sum()) > 0) == (counted > 0)


def test_prior_tuning_by_grid_and_other_links(models, data, tmp_path):
    results = run(
        config(models, data, "gpt2", "demo", tmp_path, prior_tuning="grid", link="mc"), progress=False
    )
    table = results["prior_tuning"]["table"]
    best = min(table, key=lambda row: row["nll"])
    assert results["prior_precision"] == pytest.approx(best["prior_precision"])
    bridge = run(config(models, data, "gpt2", "demo", tmp_path, link="bridge"), progress=False)
    assert bridge["stages"]["map"] == "loaded"
    # the whole posterior's predictive: every example gets a positive variance
    whole = run(config(models, data, "gpt2", "demo", tmp_path, predictive_directions="all"), progress=False)
    assert whole["stages"]["kfac"] == "loaded" and whole["stages"]["predictive"] == "computed"
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "predictive.safetensors"))
    assert bool((saved["f_var"].diagonal(dim1=-2, dim2=-1) > 0).all())


def test_head_jacobians_match_jacrev_per_example(models, data):
    """The capture-based Jacobians of the LoRA weights and of the head equal jacrev, one example at a time."""
    task = Task("toy", "classification", 2, {"test": [Example("the film was great .", ("negative", "positive"), 1),
                                                         Example("the meal was awful . the book", ("negative", "positive"), 0)]},
                choices=("negative", "positive"))  # fmt: skip
    loaded = hf.load_model(models["bert"], n_classes=2, dtype="float64")
    model = lora.attach_lora(loaded, rank=2, alpha=4.0, targets=TARGETS["bert"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    names = lora.laplace_param_names(model)
    f = hf.model_function(model, names, loaded, task)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    batch = hf.encode(task.split("test"), loaded, task, max_length=16)
    assert bool((batch["attention_mask"] == 0).any())  # padding is exercised
    assert any("modules_to_save" in n for n in names)  # the classification head is in the posterior
    ours = per_example_jacobians(f, params, batch, method=stages.JACOBIAN_METHOD)
    reference = per_example_jacobians(f, params, batch, method="loop")
    for name in names:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-9, atol=1e-11)


def test_map_training_reaches_the_map_of_the_stated_objective():
    """train_map minimises mean NLL + lambda/(2N) ||theta||^2: at its end that gradient vanishes."""
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(40, dtype=torch.float64) > 0).long()
    weight = {"w": torch.zeros(2, 3, dtype=torch.float64)}

    class Batches:
        def __iter__(self):
            return self

        def __next__(self):
            return {"labels": y, "x": x}

    def model_fn(params, batch):
        return batch["x"] @ params["w"].T

    lam = 4.0
    trained, losses = stages.train_map(
        model_fn,
        weight,
        ["w"],
        Batches(),
        n_train=40,
        steps=1500,
        lr=0.05,
        prior_precision=lam,
        progress=False,
    )
    w = trained["w"].clone().requires_grad_(True)
    objective = torch.nn.functional.cross_entropy(x @ w.T, y) + lam / 80 * w.square().sum()
    (grad,) = torch.autograd.grad(objective, w)
    assert float(grad.norm()) < 1e-3
    assert losses[-1] < losses[0]


def test_resume_skips_finished_stages_and_recomputes_changed_ones(models, data, tmp_path):
    first = run(config(models, data, "llama", "arc_easy", tmp_path), progress=False)
    again = run(config(models, data, "llama", "arc_easy", tmp_path), progress=False)
    assert again["stages"] == dict.fromkeys(config_module.STAGES, "loaded")
    assert again["metrics"] == first["metrics"]
    assert again["prior_precision"] == first["prior_precision"]
    seconds = first["stage_seconds_when_computed"]
    assert all(seconds[stage] > 0 for stage in config_module.STAGES)
    assert again["stage_seconds_when_computed"] == seconds  # how long the reused stages once took
    # a new link re-tunes the prior (default-val scores the validation NLL through the link), not
    # the MAP or K-FAC
    mc = run(config(models, data, "llama", "arc_easy", tmp_path, link="mc"), progress=False)
    assert mc["stages"] == {"map": "loaded", "kfac": "loaded", "prior": "computed", "predictive": "computed"}
    assert mc["metrics"]["map"] == first["metrics"]["map"]
    # another Fisher recomputes K-FAC and everything after it, not the MAP
    exact = run(config(models, data, "llama", "arc_easy", tmp_path, fisher="exact"), progress=False)
    assert exact["stages"] == {
        "map": "loaded",
        "kfac": "computed",
        "prior": "computed",
        "predictive": "computed",
    }
    # more steps recompute everything
    longer = run(config(models, data, "llama", "arc_easy", tmp_path, steps=7), progress=False)
    assert longer["stages"] == dict.fromkeys(config_module.STAGES, "computed")


def test_failed_run_leaves_no_result_that_looks_complete(models, data, tmp_path, monkeypatch):
    run(config(models, data, "gpt2", "demo", tmp_path), progress=False)
    assert (tmp_path / "results.json").is_file()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the predictive")

    monkeypatch.setattr(stages, "cached_covariance", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(config(models, data, "gpt2", "demo", tmp_path, prior_tuning="grid"), progress=False)
    for name in report.FINAL_OUTPUTS:
        assert not (tmp_path / name).exists(), name  # the older result was removed, no new one written
    assert not list(tmp_path.rglob(".*.tmp-*"))
    # the finished stages are still there and are reused
    monkeypatch.undo()
    resumed = run(config(models, data, "gpt2", "demo", tmp_path, prior_tuning="grid"), progress=False)
    assert resumed["stages"]["map"] == "loaded" and resumed["stages"]["kfac"] == "loaded"


def test_atomic_path_keeps_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(ZeroDivisionError), checkpoints.atomic_path(target) as tmp:
        tmp.write_text("half")
        1 / 0  # noqa: B018
    assert not target.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- bad input


def _no_result(out: Path) -> None:
    assert not (out / "results.json").exists()


def test_missing_data_file(models, data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="demo_train.jsonl"):
        run(config(models, data, "gpt2", "demo", tmp_path / "out", data_path=str(empty)), progress=False)
    _no_result(tmp_path / "out")


def test_malformed_data_file(models, data, tmp_path):
    folder = write_demo_files(tmp_path / "bad")
    with (folder / "demo_test.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(TaskDataError, match=r"demo_test.jsonl:\d+: invalid JSON"):
        run(config(models, data, "gpt2", "demo", tmp_path / "out", data_path=str(folder)), progress=False)
    _no_result(tmp_path / "out")


def test_label_outside_the_classes(models, data, tmp_path):
    folder = write_demo_files(tmp_path / "bad", bad_label_at=3)
    with pytest.raises(TaskDataError, match="label 7 is outside the classes"):
        run(config(models, data, "bert", "demo", tmp_path / "out", data_path=str(folder)), progress=False)
    _no_result(tmp_path / "out")


def test_unknown_task(models, data, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        run(dataclasses.replace(config(models, data, "gpt2", "demo", tmp_path), task="nope"), progress=False)
    _no_result(tmp_path)


def test_answer_of_several_tokens(models, tmp_path):
    choices = ("well-done", "raw")
    examples = [Example("the meal was fine . Answer:", choices, i % 2) for i in range(4)]
    task = Task(
        "steak", "multiple_choice", 2, dict.fromkeys(("train", "validation", "test"), examples), choices
    )
    cfg = RunConfig(
        model=str(models["gpt2"]), task="steak", lora_targets=("c_attn",), output_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match=r"answer 'well-done' .* is 3 tokens"):
        run(cfg, progress=False, task=task)
    _no_result(tmp_path)


def test_model_without_the_target_modules(models, data, tmp_path):
    with pytest.raises(
        ValueError, match=r"\['q_proj'\] match no linear layer.*named: query, key, value, dense"
    ):
        run(config(models, data, "bert", "demo", tmp_path, lora_targets=("q_proj",)), progress=False)
    _no_result(tmp_path)


def test_bad_configuration_values():
    with pytest.raises(ValueError, match="link must be one of"):
        RunConfig(model="m", link="logit")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        RunConfig(model="m", steps=0)
    with pytest.raises(ValueError, match="prior_precision must be a positive number"):
        RunConfig(model="m", prior_precision=-1.0)


def test_stage_keys_depend_on_the_right_fields():
    base = RunConfig(model="m")
    assert config_module.stage_key(base, "map") == config_module.stage_key(
        RunConfig(model="m", fisher="exact"), "map"
    )
    assert config_module.stage_key(base, "kfac") != config_module.stage_key(
        RunConfig(model="m", fisher="exact"), "kfac"
    )
    assert config_module.stage_key(base, "kfac") != config_module.stage_key(
        RunConfig(model="m", lr=0.5), "kfac"
    )
    evidence = RunConfig(model="m", prior_tuning="default")  # the link only turns moments into probabilities
    assert config_module.stage_key(evidence, "predictive") == config_module.stage_key(
        dataclasses.replace(evidence, link="mc"), "predictive"
    )
    # the default (default-val) scores the validation NLL through the link
    assert config_module.stage_key(base, "prior") != config_module.stage_key(
        RunConfig(model="m", link="mc"), "prior"
    )
    # the predictive's directions change the covariance (and the grid's choice), not the fit
    for stage, same in (("kfac", True), ("prior", False), ("predictive", False)):
        changed = RunConfig(model="m", predictive_directions="all")
        assert (config_module.stage_key(base, stage) == config_module.stage_key(changed, stage)) is same
