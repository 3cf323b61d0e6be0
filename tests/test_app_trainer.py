"""The Trainer glue (flaplace.app.trainer) with real, tiny ``transformers.Trainer`` runs on CPU.

References: answer scoring from ``-100``-masked token labels must give the logits of the answer
tokens that the model gives to the prompt ALONE (each example run by itself, unpadded); the
Trainer path must give the posterior of the pure functions on the same batches; the callback the
post-hoc result; SGD with weight decay ``lambda / N`` must follow the Gaussian-prior loss step by
step; and the docs page's Trainer snippet runs as written.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

from flaplace.app.trainer import (
    GaussianPriorTrainer,
    LaplaceCallback,
    answer_batch,
    fit_laplace,
    gaussian_prior_penalty,
    laplace_from_trainer,
)
from flaplace.kfac import fit
from flaplace.links import predictive_probs
from flaplace.params import LastTokenLogits, ModelFunction, select_params
from flaplace.posterior import make_posterior
from flaplace.predictive import linearised_predictive, predictive_precompute
from flaplace.temperature import TemperedModelFunction
from flaplace.tempered_evidence import soften_by_evidence

ANSWER_IDS = (3, 5)
EOS = 2
ROOT = Path(__file__).resolve().parent.parent


def causal_examples(n: int = 16, seed: int = 0) -> list[dict[str, list[int]]]:
    """Prompts of random tokens whose answer is set by the first token's parity; answer then EOS."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 3 + i % 3
        prompt = (torch.randint(8, 48, (length,), generator=g)).tolist()
        answer = ANSWER_IDS[prompt[0] % 2]
        ids = [*prompt, answer, EOS]
        labels = [-100] * length + [answer, EOS]  # the collator unmasks the answer AND the EOS
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(examples):
    """Right padding, like DataCollatorForSeq2Seq: pad ids 0, labels -100, attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[row, :k] = torch.tensor(e["input_ids"])
        labels[row, :k] = torch.tensor(e["labels"])
        mask[row, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_causal_lora(seed: int = 0):
    from tiny_models import tiny_base_model

    torch.manual_seed(seed)
    base = tiny_base_model("llama", attn_implementation="eager", initializer_range=0.2)
    return peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )


def arguments(tmp_path: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        report_to="none",
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def test_answer_batch_scores_the_prompt_alone():
    model = tiny_causal_lora().eval()
    batch = collate(causal_examples(5))
    scored = answer_batch(batch, ANSWER_IDS)
    expected = torch.tensor([ANSWER_IDS.index(e["labels"][len(e["labels"]) - 2]) for e in causal_examples(5)])
    torch.testing.assert_close(scored["labels"], expected)
    params = select_params(model, "lora")
    logits = ModelFunction(model, params, LastTokenLogits(ANSWER_IDS))(params, scored)
    with torch.no_grad():
        for row, e in enumerate(causal_examples(5)):
            prompt = torch.tensor([e["input_ids"][:-2]])
            alone = model(input_ids=prompt).logits[0, -1, list(ANSWER_IDS)]
            torch.testing.assert_close(logits[row], alone, rtol=1e-5, atol=1e-5)
    # class-index labels (a classification head) and label-free batches pass through
    plain = {"input_ids": batch["input_ids"], "labels": torch.tensor([0, 1, 0, 1, 1])}
    assert answer_batch(plain, ANSWER_IDS)["labels"] is plain["labels"]


def test_answer_batch_errors_name_the_row_and_token():
    batch = collate(causal_examples(3))
    with pytest.raises(
        ValueError, match=r"label token [35] of row 0 is not one of the answer token ids \[11\]"
    ):
        answer_batch(batch, [11])
    batch["labels"][1] = -100
    with pytest.raises(ValueError, match="row 1 of the batch has no answer token"):
        answer_batch(batch, ANSWER_IDS)


def test_trainer_post_hoc_equals_the_pure_functions(tmp_path):
    model = tiny_causal_lora()
    data = causal_examples(8)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data, data_collator=collate)
    trainer.train()
    was_training = model.training
    la = laplace_from_trainer(trainer, answer_ids=ANSWER_IDS, fisher="exact")
    # the same posterior through the pure functions, on the same batches converted by hand
    batches = [answer_batch(b, ANSWER_IDS) for b in trainer.get_train_dataloader()]
    params = select_params(model, "lora")
    model_fn = ModelFunction(model, params, LastTokenLogits(ANSWER_IDS))
    factors, state = fit(model_fn, params, batches, fisher="exact", progress=False)
    # the default without validation data: lambda and T >= 1 by the evidence
    best, _ = soften_by_evidence(model_fn, params, batches, make_posterior(factors, params, 1.0), state.log_likelihood,
                                 fisher="exact")  # fmt: skip
    tuned, temperature = best.posterior, best.temperature
    assert la.temperature == temperature
    assert float(la.log_likelihood) == pytest.approx(float(best.log_likelihood), rel=1e-5)
    lam = float(next(iter(tuned.prior_precision.values())))
    assert next(iter(la.prior_precision.values())) == pytest.approx(lam, rel=1e-4)
    probs = la(collate(data[:4]))
    assert probs.shape == (4, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    # the Trainer integration's predictive keeps the informed directions by default
    assert la.directions == "informed"
    batch = answer_batch(collate(data[:4]), ANSWER_IDS)
    hot = TemperedModelFunction(model_fn, temperature)
    f_mu, f_var = linearised_predictive(hot, predictive_precompute(tuned, "informed"), batch)
    torch.testing.assert_close(probs, predictive_probs(f_mu, f_var, "probit"), rtol=1e-3, atol=1e-4)
    whole = fit_laplace(
        model, trainer.get_train_dataloader(), answer_ids=ANSWER_IDS, fisher="exact", directions="all"
    )
    assert whole.directions == "all"
    assert (whole(collate(data[:4])) - probs).abs().max() > 1e-4  # the choice matters here
    assert model.training == was_training  # evaluated in eval mode; the user's mode is left as it was


def test_callback_fits_at_the_end_of_training_like_the_post_hoc_call(tmp_path):
    model = tiny_causal_lora()
    data = causal_examples(8)
    callback = LaplaceCallback(answer_ids=ANSWER_IDS, fisher="exact")
    trainer = Trainer(
        model=model, args=arguments(tmp_path), train_dataset=data, data_collator=collate, callbacks=[callback]
    )
    trainer.train()
    assert callback.laplace is not None
    post_hoc = fit_laplace(model, trainer.get_train_dataloader(), answer_ids=ANSWER_IDS, fisher="exact")
    assert callback.laplace.prior_precision == pytest.approx(post_hoc.prior_precision, rel=1e-4)


def prior_setup():
    data = causal_examples(16)
    model = tiny_causal_lora()
    with torch.no_grad():  # PEFT starts lora_B at zero; move off it so the penalty is not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return data, model


def trainer_run(tmp_path, model, data, start, trainer_class, **kwargs) -> dict[str, torch.Tensor]:
    model.load_state_dict(start)
    # no gradient clipping: it would clip the penalty's gradient but not SGD's weight decay
    args = arguments(
        tmp_path, optim=kwargs.pop("optim"), weight_decay=kwargs.pop("weight_decay"), max_grad_norm=0.0
    )
    trainer_class(model=model, args=args, train_dataset=data, data_collator=collate, **kwargs).train()
    return {k: v.detach().clone() for k, v in select_params(model, "lora").items()}


def test_prior_penalty_value_and_sgd_weight_decay_equivalence(tmp_path):
    data, model = prior_setup()
    lam, n = 4.0, len(data)
    expected = (
        lam
        / (2 * n)
        * sum(float(p.detach().square().sum()) for name, p in model.named_parameters() if "lora" in name)
    )
    assert float(gaussian_prior_penalty(model, lam, n)) == pytest.approx(expected, rel=1e-6)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def trained(trainer_class, **kwargs) -> dict[str, torch.Tensor]:
        return trainer_run(tmp_path, model, data, start, trainer_class, **kwargs)

    with_prior = trained(GaussianPriorTrainer, optim="sgd", weight_decay=0.0, prior_precision=lam)
    with_decay = trained(Trainer, optim="sgd", weight_decay=lam / n)
    without = trained(Trainer, optim="sgd", weight_decay=0.0)
    moved = max(float((with_prior[k] - without[k]).abs().max()) for k in with_prior)
    assert moved > 1e-4  # the prior matters over these steps
    for k in with_prior:
        torch.testing.assert_close(with_prior[k], with_decay[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_adamw_weight_decay_is_not_the_gaussian_prior(tmp_path):
    data, model = prior_setup()
    lam, n = 4.0, len(data)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    adam_prior = trainer_run(
        tmp_path,
        model,
        data,
        start,
        GaussianPriorTrainer,
        optim="adamw_torch",
        weight_decay=0.0,
        prior_precision=lam,
    )
    adamw = trainer_run(tmp_path, model, data, start, Trainer, optim="adamw_torch", weight_decay=lam / n)
    assert max(float((adam_prior[k] - adamw[k]).abs().max()) for k in adamw) > 1e-4


def test_docs_trainer_snippet_runs_as_written(tmp_path):
    page = (ROOT / "docs" / "huggingface.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    snippet = next(b for b in blocks if "laplace_from_trainer" in b)
    user_lines = [line for line in snippet.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(user_lines) <= 5, snippet
    model = tiny_causal_lora()
    data = causal_examples(16)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data, data_collator=collate)
    namespace = {"trainer": trainer, "answer_token_ids": list(ANSWER_IDS), "batch": collate(data[:4])}
    exec(compile(snippet, "docs/huggingface.md", "exec"), namespace)
    probs = namespace["probs"]
    assert probs.shape == (4, 2) and bool(torch.isfinite(probs).all())
    assert math.isclose(float(probs.sum()), 4.0, rel_tol=1e-5)
