"""The Trainer integration with a prior centred at the adapters' initialisation (``prior_mean="init"``).

References: the penalty's closed form ``lambda/(2N) ||theta - theta0||^2``; SGD with the centred
penalty equals SGD on the plain loss plus the gradient ``lambda/N (theta - theta0)`` taken by
hand; the posterior that `laplace_from_trainer` builds carries the Trainer's centre and its
evidence is the pure functions' with the same prior mean.
"""

from __future__ import annotations

import pytest
import torch
from test_app_trainer import ANSWER_IDS, arguments, causal_examples, collate, tiny_causal_lora

from flaplace.app.trainer import (
    GaussianPriorTrainer,
    LaplaceCallback,
    gaussian_prior_penalty,
    initial_prior_mean,
    laplace_from_trainer,
)
from flaplace.evidence import log_marginal_likelihood
from flaplace.params import select_params


def test_initial_prior_mean_copies_the_selected_weights_now():
    model = tiny_causal_lora()
    centre = initial_prior_mean(model, "init")
    params = select_params(model, "lora")
    assert set(centre) == set(params)
    for n, p in params.items():
        assert torch.equal(centre[n], p) and centre[n].data_ptr() != p.data_ptr()
    assert initial_prior_mean(model, "zero") is None
    with pytest.raises(ValueError, match="prior_mean must be one of"):
        initial_prior_mean(model, "origin")


def test_centred_penalty_is_the_distance_to_the_centre():
    model = tiny_causal_lora()
    centre = initial_prior_mean(model, "init")
    assert float(gaussian_prior_penalty(model, 3.0, 8, prior_mean=centre).detach()) == 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    moved = sum(float((p - centre[n]).square().sum()) for n, p in select_params(model, "lora").items())
    assert moved > 0
    assert float(gaussian_prior_penalty(model, 3.0, 8, prior_mean=centre).detach()) == pytest.approx(
        3.0 / 16 * moved
    )
    with pytest.raises(ValueError, match="one tensor per selected weight"):
        gaussian_prior_penalty(model, 3.0, 8, prior_mean={"x": torch.zeros(1)})


def test_trainer_with_init_prior_hands_its_centre_to_the_posterior(tmp_path):
    model = tiny_causal_lora()
    start = {n: p.detach().clone() for n, p in select_params(model, "lora").items()}
    data = causal_examples(8)
    trainer = GaussianPriorTrainer(
        model=model, args=arguments(tmp_path, weight_decay=0.0), train_dataset=data, data_collator=collate,
        prior_precision=2.0, prior_mean="init",
    )  # fmt: skip
    trainer.train()
    la = laplace_from_trainer(trainer, answer_ids=ANSWER_IDS, fisher="exact")
    posterior = la.posterior
    assert posterior.prior_mean is not None
    for n, value in start.items():
        assert torch.equal(posterior.prior_mean[n], value)
    assert any(not torch.equal(posterior.mean[n], start[n]) for n in start)  # training moved the weights
    # its evidence is the centred one: the zero-mean evidence of theta* - theta0
    shifted = posterior._replace(mean={n: posterior.mean[n] - start[n] for n in start}, prior_mean=None)
    assert float(la.log_marginal_likelihood()) == pytest.approx(
        float(log_marginal_likelihood(shifted, la.log_likelihood)), rel=1e-6
    )


def test_trainer_init_prior_sgd_step_matches_the_hand_gradient(tmp_path):
    """One SGD step with the centred penalty moves theta by -lr (grad NLL + lambda/N (theta - theta0))."""
    data = causal_examples(4)
    model = tiny_causal_lora()
    with torch.no_grad():  # start away from the centre so that the penalty's gradient is not zero
        centre = {n: p.detach().clone() - 0.3 for n, p in select_params(model, "lora").items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lam, lr = 4.0, 1e-2
    args = arguments(tmp_path, optim="sgd", weight_decay=0.0, max_grad_norm=0.0, max_steps=1, learning_rate=lr,
                     lr_scheduler_type="constant")  # fmt: skip
    GaussianPriorTrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, prior_precision=lam, prior_mean=centre
    ).train()  # fmt: skip
    got = {n: p.detach().clone() for n, p in select_params(model, "lora").items()}
    model.load_state_dict(state)
    plain = arguments(tmp_path, optim="sgd", weight_decay=0.0, max_grad_norm=0.0, max_steps=1, learning_rate=lr,
                      lr_scheduler_type="constant")  # fmt: skip
    from transformers import Trainer

    Trainer(model=model, args=plain, train_dataset=data, data_collator=collate).train()
    without = {n: p.detach().clone() for n, p in select_params(model, "lora").items()}
    for n in got:
        expected = without[n] - lr * lam / len(data) * (state[n] - centre[n])
        torch.testing.assert_close(got[n], expected, rtol=0, atol=1e-6)


def test_callback_with_init_prior_centres_at_the_start_of_training(tmp_path):
    model = tiny_causal_lora()
    start = {n: p.detach().clone() for n, p in select_params(model, "lora").items()}
    callback = LaplaceCallback(answer_ids=ANSWER_IDS, fisher="exact", prior_mean="init")
    trainer = GaussianPriorTrainer(
        model=model, args=arguments(tmp_path, weight_decay=0.0), train_dataset=causal_examples(8),
        data_collator=collate, prior_mean="init", callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert callback.laplace is not None and callback.laplace.posterior.prior_mean is not None
    for n, value in start.items():
        assert torch.equal(callback.laplace.posterior.prior_mean[n], value)
    with pytest.raises(ValueError, match="prior_mean must be one of"):
        LaplaceCallback(prior_mean="origin")
