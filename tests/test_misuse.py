"""Misuse: every bad input either works (checked against an independent reference) or stops with a
clear error naming the input. One test per case of issue "Nothing silent"."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_without_typechecks
from safetensors.torch import load_file, save_file
from tiny_models import ANSWERS, padded_batch, tiny_base_model, tiny_lora_model
from torch.func import jacrev

import flaplace
from flaplace.capture import CaptureError, capture
from flaplace.jacobians import per_example_jacobians
from flaplace.kfac import build, fit
from flaplace.kfac_state import kfac_factors
from flaplace.params import LastTokenLogits, ModelFunction, classifier_logits, select_params, token_mask
from flaplace.posterior import make_posterior, with_prior_precision
from flaplace.posterior_io import load_posterior, save_posterior
from flaplace.predictive import linearised_predictive
from flaplace.typing import Eigen, KronFactor, Posterior

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def random_eigen(d: int, k: int, g: torch.Generator, dtype: torch.dtype = F64) -> Eigen:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    return Eigen(q[:, :k].contiguous(), torch.rand(k, generator=g, dtype=dtype) * 3 + 0.1)


def random_posterior(params: dict[str, torch.Tensor], seed: int = 0, k: int = 3) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    factors = {
        n: KronFactor(
            random_eigen(p.shape[0], min(k, p.shape[0]), g),
            random_eigen(p.shape[1], min(k, p.shape[1]), g),
            torch.tensor(False),
        )
        for n, p in params.items()
    }
    return make_posterior(factors, params, 0.7)


def dense_covariance(posterior: Posterior) -> torch.Tensor:
    """Block-diagonal Sigma over the row-major weights, by explicit inverse of S (x) A + lambda I."""
    blocks = []
    for name, factor in posterior.factors.items():
        dense = [(e.vectors * e.values) @ e.vectors.T for e in (factor.S, factor.A)]
        precision = torch.kron(*dense)
        eye = torch.eye(precision.shape[0], dtype=precision.dtype)
        blocks.append(torch.linalg.inv(precision + posterior.prior_precision[name] * eye))
    return torch.block_diag(*blocks)


def dense_f_var(model_fn, posterior: Posterior, batch) -> torch.Tensor:
    """``J Sigma J^T`` with ``J`` from jacrev of the whole batch (examples do not interact)."""
    jac = jacrev(model_fn)(dict(posterior.mean), batch)
    flat = torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in posterior.mean], dim=-1)
    return flat @ dense_covariance(posterior) @ flat.mT


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------- cases


def test_training_mode_model_is_evaluated_in_eval_mode():
    """Dropout active in train mode made f random; the model function now runs in eval mode."""
    model = tiny_lora_model("gpt2", targets=["c_attn"])  # GPT-2's dropout probabilities are 0.1
    batch = padded_batch("gpt2")
    params = select_params(model, "lora")
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = reference[torch.arange(3), batch["attention_mask"].cumsum(1).argmax(1)][:, list(ANSWERS)]
    model.train()
    f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    torch.testing.assert_close(f(params, batch), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f(params, batch), f(params, batch), rtol=0, atol=0)
    assert model.training and all(m.training for m in model.modules())  # the user's mode is back
    # The K-FAC factors of the train-mode model are those of the eval-mode one.
    options = {"fisher": "exact", "lr_threshold": None, "progress": False}
    trained, _ = fit(f, params, [batch], **options)
    evaluated, _ = fit(
        ModelFunction(model.eval(), params, LastTokenLogits(ANSWERS)), params, [batch], **options
    )
    for name in params:
        torch.testing.assert_close(trained[name].A.values, evaluated[name].A.values, rtol=1e-10, atol=1e-12)


def test_weight_tied_to_an_embedding_is_refused_by_capture_and_exact_in_the_predictive():
    """GPT-2's lm_head is its input embedding: capture names both uses; the predictive is exact."""
    torch.manual_seed(0)
    model = tiny_base_model("gpt2").to(F64).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    params = select_params(model, "wte")
    f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    batch = padded_batch("gpt2")
    with pytest.raises(CaptureError, match=r"embedding.*tied|linear layer .* also by .*embedding"):
        capture(f, params, batch, tuple(token_mask(batch).shape))
    with pytest.raises(CaptureError, match="embedding"):
        fit(f, params, [batch], fisher="exact", progress=False)
    posterior = random_posterior(params)
    f_mu, f_var = linearised_predictive(f, posterior, batch)  # the default method falls back
    torch.testing.assert_close(f_var, dense_f_var(f, posterior, batch), rtol=1e-8, atol=1e-10)
    loop = per_example_jacobians(f, params, batch, method="loop")
    whole = jacrev(f)(params, batch)
    torch.testing.assert_close(loop[next(iter(params))], whole[next(iter(params))], rtol=1e-10, atol=1e-12)


def test_posterior_validation_and_damaged_files(tmp_path):
    """NaN/inf/non-positive prior precisions are refused everywhere; damaged files get clear errors."""
    params = {"w": torch.randn(3, 4, dtype=F64)}
    posterior = random_posterior(params)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="prior precision.*positive and finite"):
            make_posterior(posterior.factors, params, bad)
        with pytest.raises(ValueError, match="positive and finite"):
            with_prior_precision(posterior, bad)
        broken = posterior._replace(prior_precision={"w": torch.tensor(bad, dtype=F64)})
        with pytest.raises(ValueError, match="prior precision of 'w' must be positive and finite"):
            flaplace.log_marginal_likelihood(broken, -3.0)
        with pytest.raises(ValueError, match="positive and finite"):
            flaplace.tune_prior_evidence(broken, -3.0, progress=False)
    good = tmp_path / "posterior.safetensors"
    save_posterior(good, posterior)
    tensors = load_file(good)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as handle:
        metadata = handle.metadata()
    nan_file = tmp_path / "nan.safetensors"
    save_file({**tensors, "w|prior_precision": torch.tensor(float("nan"), dtype=F64)}, nan_file, metadata)
    with pytest.raises(ValueError, match=r"nan\.safetensors: prior precision of 'w' must be positive"):
        load_posterior(nan_file)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match="damaged or not a posterior file"):
        load_posterior(truncated)
    bad_json = tmp_path / "json.safetensors"
    save_file(tensors, bad_json, {**metadata, "names": "['w'"})
    with pytest.raises(ValueError, match="block list .* unreadable"):
        load_posterior(bad_json)
    short = tmp_path / "short.safetensors"
    save_file(tensors, short, {**metadata, "transposed": "[]"})
    with pytest.raises(ValueError, match="do not match"):
        load_posterior(short)
    with pytest.raises(IsADirectoryError, match="is a folder; pass the posterior file"):
        load_posterior(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_posterior(tmp_path / "missing.safetensors")
    assert float(load_posterior(good).prior_precision["w"]) == pytest.approx(0.7)


def test_batches_without_labels_make_the_evidence_refuse():
    """The log-likelihood of unlabelled batches is unknown (NaN), and the evidence says why."""
    model = tiny_lora_model("llama")
    params = select_params(model, "lora")
    f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    batch = padded_batch("llama")
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    factors, state = fit(f, params, [batch, unlabelled], fisher="exact", lr_threshold=None, progress=False)
    assert math.isnan(float(state.log_likelihood))
    posterior = make_posterior(factors, params, 1.0)
    with pytest.raises(ValueError, match="no 'labels'"):
        flaplace.log_marginal_likelihood(posterior, state.log_likelihood)
    with pytest.raises(ValueError, match="no 'labels'"):
        flaplace.tune_prior_evidence(posterior, state.log_likelihood, progress=False)
    _, labelled = fit(f, params, [batch], fisher="exact", lr_threshold=None, progress=False)
    assert math.isfinite(float(labelled.log_likelihood))


def test_answer_ids_are_checked_and_all_padding_rows_refused():
    with pytest.raises(ValueError, match="duplicate id"):
        LastTokenLogits([3, 5, 3])
    with pytest.raises(ValueError, match="non-negative"):
        LastTokenLogits([3, -1])
    with pytest.raises(TypeError, match="must be integers"):
        LastTokenLogits([3.0, 5.7])
    with pytest.raises(TypeError, match="must be integers"):
        LastTokenLogits(torch.tensor([3.0, 5.0]))
    with pytest.raises(ValueError, match="out of range for vocab_size 6"):
        LastTokenLogits([3, 6], vocab_size=6)
    model = tiny_lora_model("llama")
    params = select_params(model, "lora")
    batch = padded_batch("llama")
    with pytest.raises(ValueError, match="token id 48 .* out of range .* 48 tokens"):
        ModelFunction(model, params, LastTokenLogits([3, 48]))(params, batch)
    f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] .* no real token"):
        fit(f, params, [padded], fisher="exact", progress=False)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] .* no real token"):
        linearised_predictive(f, random_posterior(params), padded)


def test_distributed_fit_without_a_process_group_is_refused():
    model = tiny_lora_model("llama")
    params = select_params(model, "lora")
    f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"distributed=True\) needs an initialised .*init_process_group"):
        fit(f, params, [padded_batch("llama")], distributed=True, progress=False)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_weights_give_the_float32_results(half):
    """bf16/fp16 base and LoRA weights: factors and predictive in float32, within 1% of float32."""
    model = tiny_lora_model("llama", dtype=half)
    wide = copy.deepcopy(model).float()  # the same (rounded) weights, cast up exactly
    batches = [padded_batch("llama", seed=s) for s in (1, 2)]
    results = {}
    for key, m in (("half", model), ("float32", wide)):
        params = select_params(m, "lora")
        f = ModelFunction(m, params, LastTokenLogits(ANSWERS))
        factors, state = fit(f, params, batches, fisher="exact", lr_threshold=None, progress=False)
        posterior = make_posterior(factors, params, 1.0)
        f_mu, f_var = linearised_predictive(f, posterior, batches[0])
        log_z = flaplace.log_marginal_likelihood(posterior, state.log_likelihood)
        probs = flaplace.predictive_probs(f_mu, f_var, link="probit")
        assert f_mu.dtype == f_var.dtype == torch.float32 and torch.isfinite(f_var).all(), key
        assert torch.isfinite(probs).all() and torch.isfinite(log_z)
        std = f_var.diagonal(dim1=-2, dim2=-1).sqrt()
        results[key] = {"f_mu": f_mu, "std": std, "probs": probs, "log_z": log_z, "ll": state.log_likelihood}
        results[key]["f_var"] = f_var
    errors = {k: _rel(results["half"][k], results["float32"][k]) for k in results["half"]}
    # bf16 rounds every activation to 8 bits of mantissa: the logits differ by ~0.7% from float32
    # and the Jacobians by ~1%, so f_var (quadratic in them) by ~1.3%; the predictive standard
    # deviations, probabilities and the evidence are within 1%.
    assert all(e < 0.01 for k, e in errors.items() if k != "f_var"), (half, errors)
    assert errors["f_var"] < 0.02, (half, errors)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_default_predictive_works_on_stock_hf_models(arch):
    """Default attention implementation (SDPA), default method: equal to the per-example loop."""
    torch.manual_seed(0)
    model = tiny_lora_model(arch)
    params = select_params(model, "lora")
    output = classifier_logits if arch == "bert" else LastTokenLogits(ANSWERS)
    f = ModelFunction(model, params, output)
    batch = padded_batch(arch)
    posterior = random_posterior(params, k=2)
    f_mu, f_var = linearised_predictive(f, posterior, batch)
    f_mu_loop, f_var_loop = linearised_predictive(f, posterior, batch, method="loop")
    torch.testing.assert_close(f_var, f_var_loop, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f_mu, f_mu_loop, rtol=1e-10, atol=1e-10)


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    """A DistributedDataParallel model (a 1-process gloo group) gives the plain model's results."""
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_lora_model("llama")
    batch = padded_batch("llama")
    params = select_params(model, "lora")
    plain = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    compiled = torch.compile(model)  # an OptimizedModule keeps the model as _orig_mod
    assert list(select_params(compiled, "lora")) == list(params)
    assert ModelFunction(compiled, params, LastTokenLogits(ANSWERS)).model is model
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        wrapped_params = select_params(wrapped, "lora")
        assert list(wrapped_params) == list(params)
        f = ModelFunction(wrapped, wrapped_params, LastTokenLogits(ANSWERS))
        options = {"fisher": "exact", "lr_threshold": None, "progress": False}
        got, _ = fit(f, wrapped_params, [batch], distributed=True, **options)
        posterior = make_posterior(got, wrapped_params, 1.0)
        f_mu, f_var = linearised_predictive(f, posterior, batch)
    finally:
        dist.destroy_process_group()
    want, _ = fit(plain, params, [batch], **options)
    for name in params:
        torch.testing.assert_close(got[name].S.values, want[name].S.values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        f_var, linearised_predictive(plain, posterior, batch)[1], rtol=1e-10, atol=1e-12
    )


def test_non_finite_logits_and_empty_batches_are_named():
    model = tiny_lora_model("llama")
    params = select_params(model, "lora")
    f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    batch = padded_batch("llama")
    posterior = random_posterior(params, k=2)
    empty = {k: v[:0] for k, v in batch.items()}
    with pytest.raises(ValueError, match="K-FAC batch 0: the batch has 0 rows"):
        fit(f, params, [empty], progress=False)
    with pytest.raises(ValueError, match="0 rows"):
        linearised_predictive(f, posterior, empty)
    init, update = build(f, fisher="exact", lr_threshold=None)
    state = update(init(params), params, batch)
    name = next(iter(params))
    with pytest.raises(FloatingPointError, match="non-finite \\(NaN/inf\\) K-FAC statistics"):
        kfac_factors(state._replace(S={**state.S, name: state.S[name] * float("nan")}))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_input_embeddings().weight[5] = float("nan")
    nan_batch = {**batch, "input_ids": batch["input_ids"].clone()}
    nan_batch["input_ids"][0, -1] = 5
    g = ModelFunction(broken, select_params(broken, "lora"), LastTokenLogits(ANSWERS))
    with pytest.raises(FloatingPointError, match="K-FAC batch 1: non-finite \\(NaN/inf\\) logits"):
        fit(g, select_params(broken, "lora"), [batch, nan_batch], fisher="mc", progress=False)
    with pytest.raises(ValueError, match="non-finite \\(NaN/inf\\) logits"):
        linearised_predictive(g, posterior, nan_batch)


COMPILE_TWICE = """
import json, torch
from tiny_models import ANSWERS, padded_batch, tiny_lora_model
from flaplace.kfac import build
from flaplace.params import LastTokenLogits, ModelFunction, select_params
model = tiny_lora_model("llama", dtype=torch.float32)
params = select_params(model, "lora")
batch = padded_batch("llama")
init, update = build(ModelFunction(model, params, LastTokenLogits(ANSWERS)), fisher="mc", lr_threshold=None)
compiles = []
def backend(gm, example_inputs):  # every graph (one per break, one per recompilation) comes here
    compiles.append(1)
    return gm.forward
compiled = torch.compile(update, backend=backend)
state = eager = init(params, batch)
for call in range(3):
    torch.manual_seed(call)  # mc without a generator: the global RNG, seeded
    state = compiled(state, params, batch)
    torch.manual_seed(call)
    eager = update(eager, params, batch)
err = max(float((state.S[n] - eager.S[n]).norm() / eager.S[n].norm()) for n in params)
print(json.dumps({"compiles": len(compiles), "shared": len(state.A) < len(params), "err": err}))
"""


def test_compiled_update_compiles_once_with_shared_input_factors():
    """Sharing is dict structure, not object identity: calls 2 and 3 reuse the first compilation."""
    record = json.loads(run_without_typechecks(COMPILE_TWICE).strip().splitlines()[-1])
    assert record["compiles"] == 1, record  # no graph break, no recompilation
    assert record["shared"]
    assert record["err"] < 1e-5, record


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The library in 10 lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's library example is missing"
    return match.group(1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_readme_example_runs_as_written(arch):
    """The README's python block on a stock causal LM, a GPT-2 and a BERT classifier (train mode)."""
    source = _readme_block()
    if arch == "bert":  # a classifier head: its logits are the classes
        assert "flaplace.LastTokenLogits(answer_token_ids)" in source
        source = source.replace("flaplace.LastTokenLogits(answer_token_ids)", "flaplace.classifier_logits")
    probs = {}
    for mode in ("train", "eval"):  # train: as get_peft_model leaves a freshly built model
        peft_model = tiny_lora_model(arch, dtype=torch.float32).train(mode == "train")
        namespace = {
            "peft_model": peft_model,
            "answer_token_ids": list(ANSWERS),
            "train_batches": [padded_batch(arch, seed=s) for s in (1, 2)],
            "test_batch": padded_batch(arch, seed=3),
        }
        torch.manual_seed(0)  # the example's Monte Carlo Fisher draws from the global RNG
        exec(compile(source, "README.md", "exec"), namespace)
        probs[mode] = namespace["probs"]
    assert torch.isfinite(probs["train"]).all() and probs["train"].shape == (3, 3)
    torch.testing.assert_close(probs["train"], probs["eval"], rtol=1e-5, atol=1e-6)
