"""Trainer integration after training as LoRA users train: bf16 mixed precision and gradient checkpointing.

Real ``trl.SFTTrainer`` and ``transformers.Trainer`` runs on CPU (``use_cpu=True``; CPU autocast
runs in bfloat16). After such a run accelerate leaves ``model.forward`` wrapped in a bf16 autocast,
gradient checkpointing is on and the input embeddings carry ``enable_input_require_grads``'s
forward hook (twice under TRL).

"The same run in float32", in the probability tests: a twin trained from the same initial weights,
on the same data, with the same seed and settings, but with ``bf16=False`` and without gradient
checkpointing (which changes no value). The two MAPs differ only by bf16 rounding during training,
so their posteriors' probabilities must agree within 1%. The K-FAC factors, which depend on the
evaluation precision alone, are compared EXACTLY with those of the same trained weights after
accelerate's wrapper is removed by accelerate itself (``extract_model_from_parallel(...,
keep_fp32_wrapper=False)``); a fit through the leftover autocast forward differs from it (its log-likelihood by ~1e-3).
"""

from __future__ import annotations

import datasets
import pytest
import torch
from accelerate.utils import extract_model_from_parallel
from test_app_trainer import ANSWER_IDS, arguments, causal_examples, collate, tiny_causal_lora
from tiny_hf import tiny_tokenizer
from torch.func import functional_call
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from flaplace.app.trainer import LaplaceCallback, answer_batch, laplace_from_trainer
from flaplace.jacobians import per_example_jacobians
from flaplace.kfac import fit
from flaplace.params import LastTokenLogits, ModelFunction, select_params

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def sft_run(tmp_path, *, bf16: bool, checkpointing: bool):
    """A real SFTTrainer run (4 steps) on a tiny Llama with LoRA; the callback fits at its end."""
    model = tiny_causal_lora()
    args = SFTConfig(
        output_dir=str(tmp_path / f"sft-{bf16}"),
        report_to="none",
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=2e-3,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=bf16,
        gradient_checkpointing=checkpointing,
    )
    callback = LaplaceCallback(answer_ids=ANSWER_IDS)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(causal_examples(16)),
        eval_dataset=datasets.Dataset.from_list(causal_examples(8, seed=1)),
        processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )
    torch.manual_seed(0)  # the callback's Monte Carlo Fisher draws the same samples in both runs
    trainer.train()
    return trainer, callback


def training_state(model: torch.nn.Module) -> dict[str, object]:
    """What flaplace must leave as it found it: forward wrappers, checkpointing flags, hooks, modes."""
    return {
        "forward": model.__dict__.get("forward"),
        "checkpointing": [getattr(m, "gradient_checkpointing", None) for m in model.modules()],
        "hooks": {n: list(m._forward_hooks.values()) for n, m in model.named_modules() if m._forward_hooks},
        "training": [m.training for m in model.modules()],
        "require_grads": getattr(model.get_base_model(), "_require_grads_hooks", None),
    }


def predictions(trainer, callback) -> dict[str, torch.Tensor]:
    """The documented calls: post hoc, its predict_all, the val_nll prior, and the callback."""
    batch = next(iter(trainer.get_eval_dataloader()))
    torch.manual_seed(1)
    la = laplace_from_trainer(trainer, answer_ids=ANSWER_IDS)
    torch.manual_seed(1)
    tuned = laplace_from_trainer(trainer, answer_ids=ANSWER_IDS, prior="val_nll")
    probs_all, labels = la.predict_all(trainer.get_eval_dataloader())
    assert labels is not None and len(labels) == len(probs_all) == 8
    return {
        "post_hoc": la(batch),
        "predict_all": probs_all,
        "val_nll": tuned(batch),
        "callback": callback.laplace(batch),
    }


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def test_sft_bf16_with_checkpointing_matches_its_float32_twin_and_restores_the_model(tmp_path):
    trainer, callback = sft_run(tmp_path, bf16=True, checkpointing=True)
    model = trainer.model
    # what TRL's defaults leave on the model, which the Jacobians used to fail on
    assert "_original_forward" in model.__dict__ and model.get_base_model().is_activation_checkpointing
    assert model.get_input_embeddings()._forward_hooks
    before = training_state(model)
    mixed = predictions(trainer, callback)
    # every Jacobian method runs (each failed on this model: dtype mismatch, or requires_grad_ under vmap)
    batch = answer_batch(next(iter(trainer.get_eval_dataloader())), ANSWER_IDS)
    params = select_params(model, "lora")
    f = ModelFunction(model, params, LastTokenLogits(ANSWER_IDS))
    jacobians = {m: per_example_jacobians(f, params, batch, method=m) for m in ("capture", "vmap", "loop")}
    for name in params:
        torch.testing.assert_close(jacobians["vmap"][name], jacobians["capture"][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(jacobians["loop"][name], jacobians["capture"][name], rtol=1e-4, atol=1e-6)
    # and gradient checkpointing is switched off inside a training-mode call too, then restored
    was_training = model.training
    model.train()
    train_jac = per_example_jacobians(f.training(), params, batch, method="vmap")
    for name in params:
        torch.testing.assert_close(train_jac[name], jacobians["capture"][name], rtol=1e-4, atol=1e-6)
    model.train(was_training)
    after = training_state(model)
    assert after["forward"] is before["forward"]  # accelerate's wrapper is still the model's forward
    assert after["checkpointing"] == before["checkpointing"] and any(after["checkpointing"])
    assert after["hooks"] == before["hooks"] and after["require_grads"] is before["require_grads"]
    assert after["training"] == before["training"]

    twin_trainer, twin_callback = sft_run(tmp_path, bf16=False, checkpointing=False)
    assert "_original_forward" not in twin_trainer.model.__dict__
    float32 = predictions(twin_trainer, twin_callback)
    for key, probs in mixed.items():
        assert probs.dtype == torch.float32 and torch.isfinite(probs).all(), key
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
        assert relative_gap(probs, float32[key]) < 0.01, (key, relative_gap(probs, float32[key]))
    # the runs are not identical: bf16 training moved the adapters elsewhere (the 1% is a real bound)
    moved = max(
        float((p - q).abs().max())
        for p, q in zip(
            select_params(model, "lora").values(),
            select_params(twin_trainer.model, "lora").values(),
            strict=True,
        )
    )
    assert moved > 0


def exact_factors(model, batches, model_fn=None):
    params = select_params(model, "lora")
    f = model_fn or ModelFunction(model, params, LastTokenLogits(ANSWER_IDS))
    factors, state = fit(f, params, batches, fisher="exact", lr_threshold=None, progress=False)
    return torch.utils._pytree.tree_leaves(factors), state


def wrapped_model_fn(model):
    """The model function without flaplace's plain evaluation: accelerate's autocast forward runs."""
    output_fn = LastTokenLogits(ANSWER_IDS)

    def f(params, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return output_fn(functional_call(model, params, (), {**inputs, "use_cache": False}), batch)

    return f


def test_trainer_bf16_factors_are_those_without_autocast(tmp_path):
    """A plain Trainer with bf16=True: K-FAC ignores the leftover autocast; predictions near float32."""
    data = causal_examples(16)
    runs = {}
    for bf16 in (True, False):
        trainer = Trainer(
            model=tiny_causal_lora(),
            args=arguments(tmp_path, bf16=bf16, learning_rate=2e-3),
            train_dataset=data,
            data_collator=collate,
        )
        trainer.train()
        runs[bf16] = trainer
    model = runs[True].model.eval()
    assert "_original_forward" in model.__dict__
    wrapped_forward = model.forward
    batches = [answer_batch(collate(data[i : i + 4]), ANSWER_IDS) for i in range(0, 16, 4)]
    factors, state = exact_factors(model, batches)
    under_autocast, autocast_state = exact_factors(model, batches, wrapped_model_fn(model))
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(RuntimeError, match=r"inside torch.autocast \(cpu\); .* outside the autocast block"),
    ):
        exact_factors(model, batches)  # an autocast the user opens is refused, not silently used
    torch.manual_seed(1)
    probs = laplace_from_trainer(runs[True], answer_ids=ANSWER_IDS)(collate(data[:8]))
    assert model.forward == wrapped_forward
    plain = extract_model_from_parallel(model, keep_fp32_wrapper=False)  # accelerate's own unwrapping
    assert "_original_forward" not in plain.__dict__
    reference, reference_state = exact_factors(plain, batches)
    assert float(state.log_likelihood) == float(reference_state.log_likelihood)
    for got, want in zip(factors, reference, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.dtype in (torch.float32, torch.bool, torch.int64), got.dtype  # not silently bf16
    # fitting through the autocast forward differs (factors and likelihood): the equality is informative
    assert any(not torch.equal(a, b) for a, b in zip(under_autocast, reference, strict=True))
    gap = abs(float(autocast_state.log_likelihood) / float(reference_state.log_likelihood) - 1)
    assert gap > 1e-5, gap
    torch.manual_seed(1)
    twin = laplace_from_trainer(runs[False], answer_ids=ANSWER_IDS)(collate(data[:8]))
    assert relative_gap(probs, twin) < 0.01, relative_gap(probs, twin)
