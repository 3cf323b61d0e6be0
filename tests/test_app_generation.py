"""Generation with per-token uncertainty (flaplace.app.generation) on a tiny random PEFT Llama.

References: Hugging Face's own greedy ``generate`` (a nearly certain posterior must reproduce it),
and the first step's entropy and mutual information recomputed by full forwards of explicitly
sampled weights through ``functional_call``.
"""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_hf import tiny_tokenizer
from tiny_models import tiny_base_model
from torch.func import functional_call

from flaplace.app.generation import generate_with_uncertainty, swapped_weights
from flaplace.params import select_params
from flaplace.posterior import make_posterior
from flaplace.typing import Eigen, KronFactor
from flaplace.vocabulary import sample_perturbations

PROMPT = "the film was"


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = tiny_base_model("llama", vocab=len(tok), initializer_range=0.3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    params = select_params(model, "lora")
    factors = {}
    for name, p in params.items():
        o, i = p.shape
        q_s, _ = torch.linalg.qr(torch.randn(o, 2, generator=g))
        q_a, _ = torch.linalg.qr(torch.randn(i, 2, generator=g))
        factors[name] = KronFactor(
            S=Eigen(q_s, torch.rand(2, generator=g) + 0.5), A=Eigen(q_a, torch.rand(2, generator=g) + 0.5),
            transposed=torch.tensor(False),
        )  # fmt: skip
    loose = make_posterior(factors, {n: p.clone() for n, p in params.items()}, 2.0)
    tight = make_posterior(factors, {n: p.clone() for n, p in params.items()}, 1e12)
    return model, tok, loose, tight


def plain_greedy(model, tok, steps: int) -> list[int]:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("mode", ["weights", "linearised"])
def test_certain_posterior_reproduces_greedy_generate(setup, mode) -> None:
    model, tok, _, tight = setup
    out = generate_with_uncertainty(
        model,
        tok,
        tight,
        PROMPT,
        mode=mode,
        n_samples=3,
        max_new_tokens=5,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.token_ids.tolist() == plain_greedy(model, tok, 5)
    assert float(out.mutual_information.max()) < 1e-6
    assert len(out.tokens) == len(out.token_ids) and isinstance(out.text, str)


@pytest.mark.parametrize("mode", ["weights", "linearised"])
def test_generation_is_reproducible_and_uncertain(setup, mode) -> None:
    model, tok, loose, _ = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runs = [
        generate_with_uncertainty(
            model,
            tok,
            loose,
            PROMPT,
            mode=mode,
            n_samples=4,
            max_new_tokens=4,
            generator=torch.Generator().manual_seed(3),
            do_sample=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert runs[0].token_ids.tolist() == runs[1].token_ids.tolist()
    torch.testing.assert_close(runs[0].mutual_information, runs[1].mutual_information)
    assert float(runs[0].mutual_information.max()) > 1e-4
    assert bool((runs[0].entropy >= runs[0].aleatoric - 1e-9).all())
    for n, p in model.named_parameters():  # the user's model is left as it was
        assert torch.equal(p, before[n])


def test_weight_space_first_step_matches_explicit_samples(setup) -> None:
    model, tok, loose, _ = setup
    out = generate_with_uncertainty(
        model,
        tok,
        loose,
        PROMPT,
        mode="weights",
        n_samples=4,
        max_new_tokens=1,
        generator=torch.Generator().manual_seed(5),
    )
    deltas = sample_perturbations(loose, 4, torch.Generator().manual_seed(5))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    probs = []
    with torch.no_grad():
        for s in range(4):
            weights = {n: loose.mean[n] + deltas[n][s] for n in loose.mean}
            logits = functional_call(model, weights, (), {"input_ids": ids}).logits[0, -1]
            probs.append(torch.softmax(logits.double(), -1))
    p = torch.stack(probs)
    mean = p.mean(0)
    entropy = -(mean * mean.log()).sum()
    aleatoric = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(out.entropy[0], entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mutual_information[0], entropy - aleatoric, rtol=1e-4, atol=1e-6)
    assert int(out.token_ids[0]) == int(mean.argmax())


def test_errors_are_clear(setup) -> None:
    model, tok, loose, _ = setup
    with pytest.raises(ValueError, match="mode"):
        generate_with_uncertainty(model, tok, loose, PROMPT, mode="beam")
    with pytest.raises(ValueError, match="not a parameter"), swapped_weights(model, {"nope": torch.zeros(1)}):
        pass
