"""The posterior of a generatively fine-tuned adapter after a real TRL ``SFTTrainer`` run (CPU, tiny Llama).

TRL masks the prompt of a prompt-completion dataset with -100 (``completion_only_loss``); the
reference is the pure token-level fit on the Trainer's own batches, and the model's own SFT loss.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from flaplace.evaluation import plain_evaluation

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from flaplace.app.trainer import LaplaceCallback, fit_laplace, laplace_from_trainer  # noqa: E402
from flaplace.kfac import fit  # noqa: E402
from flaplace.params import ModelFunction, select_params  # noqa: E402
from flaplace.tokens import SupervisedTokenLogits  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[EOS]", "the", "film", "meal", "book", "was", "good", "bad", ".", "it"]


def word_tokenizer():
    """A word-level fast tokenizer without templates: a prompt's tokens are a prefix of prompt + completion."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def sft_trainer(tmp_path: Path, callbacks=()):
    from tests.tiny_models import tiny_base_model

    torch.manual_seed(0)
    base = tiny_base_model("llama", vocab=len(WORDS), pad_token_id=0, eos_token_id=2)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    nouns, moods = ["film", "meal", "book"], ["good", "bad"]
    rows = [
        {
            "prompt": f"the {nouns[i % 3]} was",
            "completion": f" {moods[i % 2]} ." + (" it was" if i % 4 == 0 else ""),
        }
        for i in range(8)
    ]
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_tokenizer(),
        callbacks=list(callbacks),
    )
    return trainer


def test_laplace_from_sft_trainer_fits_the_token_posterior(tmp_path):
    callback = LaplaceCallback(fisher="exact")  # deterministic: the batches come shuffled
    trainer = sft_trainer(tmp_path, callbacks=[callback])
    trainer.train()
    batches = list(trainer.get_train_dataloader())
    first = batches[0]
    prompt = first["labels"][:, :3]  # "the <noun> was": masked by TRL's collator
    assert bool((prompt == -100).all()) and bool((first["labels"] != -100).any())

    la = laplace_from_trainer(trainer, fisher="exact")
    model = trainer.model.eval()
    params = select_params(model, "lora")
    f = ModelFunction(model, params, SupervisedTokenLogits())
    _, state = fit(f, params, batches, progress=False)
    torch.testing.assert_close(la.log_likelihood, state.log_likelihood)
    # the Trainer's own loss, evaluated as flaplace evaluates (float32: SFTConfig's bf16 autocast
    # wrapper is taken off, as for every documented call)
    with torch.no_grad(), plain_evaluation(model):
        summed = sum(
            float(model(**b).loss)
            * int(((b["labels"][:, 1:] != -100) & b["attention_mask"][:, 1:].bool()).sum())
            for b in batches
        )
    assert float(la.log_likelihood) == pytest.approx(-summed, rel=1e-5)
    assert all(v > 0 for v in la.prior_precision.values()) and la.history  # tuned by the evidence

    assert callback.laplace is not None  # the callback fits the same posterior when training ends
    torch.testing.assert_close(callback.laplace.log_likelihood, la.log_likelihood)
    for name, value in la.prior_precision.items():
        assert callback.laplace.prior_precision[name] == pytest.approx(value, rel=1e-4)

    with pytest.raises(ValueError, match=r"prior='default' \(the evidence\)") as caught:
        fit_laplace(model, batches, prior="val_nll")
    assert "\n" not in str(caught.value)
