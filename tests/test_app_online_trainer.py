"""Online evidence tuning inside a real, tiny ``transformers.Trainer`` run on CPU.

References: with the learning rate 0 (the MAP cannot move) and a window that holds the whole
training set, the callback's prior precision must equal post-hoc tuning on the same batches;
the Trainer's loss must be the plain loss plus `prior_penalty` at the callback's current prior.
"""

from __future__ import annotations

import pytest
import torch
from test_app_trainer import ANSWER_IDS, arguments, causal_examples, collate, tiny_causal_lora

from flaplace.app.online_trainer import OnlineEvidenceCallback, OnlineEvidenceTrainer
from flaplace.app.trainer import answer_batch, gaussian_prior_penalty, initial_prior_mean
from flaplace.evidence import tune_prior_evidence
from flaplace.kfac import fit
from flaplace.online import prior_penalty
from flaplace.params import LastTokenLogits, ModelFunction, select_params
from flaplace.posterior import make_posterior
from flaplace.predictive import linearised_predictive


@pytest.mark.parametrize("accumulate", [1, 2])
def test_frozen_training_reaches_the_post_hoc_prior(tmp_path, accumulate):
    """Eight examples, four per optimiser step (one batch, or two micro-batches of two)."""
    model = tiny_causal_lora()
    data = causal_examples(8)
    online = OnlineEvidenceCallback(answer_ids=ANSWER_IDS, every=2, prior_precision=1e-2, fisher="exact")
    args = arguments(
        tmp_path,
        max_steps=8,
        learning_rate=0.0,
        weight_decay=0.0,
        per_device_train_batch_size=4 // accumulate,
        gradient_accumulation_steps=accumulate,
    )
    trainer = OnlineEvidenceTrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, online=online
    )
    trainer.train()
    batches = [answer_batch(b, ANSWER_IDS) for b in trainer.get_train_dataloader()]
    params = select_params(model, "lora")
    model_fn = ModelFunction(model, params, LastTokenLogits(ANSWER_IDS))
    factors, state = fit(model_fn, params, batches, fisher="exact", progress=False)
    tuned, _ = tune_prior_evidence(make_posterior(factors, params, 1.0), state.log_likelihood, progress=False)
    want = float(next(iter(tuned.prior_precision.values())))
    assert len(online.history) == 5  # four refreshes in training, one at the end
    assert all(len(step) == accumulate for step in online.state.window)
    assert online.history[-1]["prior_precision"][next(iter(params))] == pytest.approx(want, rel=1e-3)
    assert online.posterior is not None
    assert float(next(iter(online.posterior.prior_precision.values()))) == pytest.approx(want, rel=1e-3)
    f_mu, f_var = linearised_predictive(online.model_fn, online.posterior, batches[0])
    assert f_var.shape == (len(batches[0]["labels"]), 2, 2) and bool(torch.isfinite(f_var).all())


def test_training_loss_uses_the_current_prior_and_the_prior_moves(tmp_path):
    model = tiny_causal_lora()
    data = causal_examples(16)
    online = OnlineEvidenceCallback(answer_ids=ANSWER_IDS, every=2, prior_precision=1e4, fisher="exact")
    args = arguments(tmp_path, max_steps=8, learning_rate=1e-2, weight_decay=0.0)
    trainer = OnlineEvidenceTrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, online=online
    )
    trainer.train()
    values = [next(iter(h["prior_precision"].values())) for h in online.history]
    assert values[-1] < 1e4 / 10  # the evidence relaxed a far too strong prior while training
    batch = collate(data[:4])
    with torch.no_grad():
        got = trainer.compute_loss(model, dict(batch))
        plain = model(**batch).loss
    params = {n: p for n, p in model.named_parameters() if n in online.state.prior_precision}
    want = plain + prior_penalty(params, online.state.prior_precision, len(data))
    assert float(got) == pytest.approx(float(want.detach()), rel=1e-6)
    assert float((want - plain).detach()) > 0


def test_the_penalty_needs_training_to_have_begun():
    with pytest.raises(RuntimeError, match="when training begins"):
        OnlineEvidenceCallback().penalty(tiny_causal_lora())
    with pytest.raises(ValueError, match="prior_mean"):
        OnlineEvidenceCallback(prior_mean="middle")


def test_core_penalty_is_the_trainer_integrations_penalty():
    model = tiny_causal_lora()
    centre = initial_prior_mean(model, "init")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.add_(0.3)
    params = {n: p for n, p in model.named_parameters() if n in centre}
    got = prior_penalty(params, 2.5, 16, centre)
    want = gaussian_prior_penalty(model, 2.5, 16, prior_mean=centre)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert float(got.detach()) > 0
