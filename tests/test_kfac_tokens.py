"""Token-level K-FAC of a causal LM trained on token labels (Hugging Face's -100 convention).

References are independent of the capture: dense GGNs from ``torch.func.jacrev`` of the supervised
logits, closed forms for a per-position model, the model's own SFT loss, and K-FAC's exact cases.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from flaplace.compiling import compile_update
from flaplace.evidence import tune_prior_evidence
from flaplace.kfac import build, fit
from flaplace.laplace import LaplaceLoRA
from flaplace.params import LastTokenLogits, ModelFunction, logits_of, select_params
from flaplace.posterior import make_posterior
from flaplace.sequences import sequence_scores
from flaplace.token_fisher import token_cotangents
from flaplace.tokens import (
    MAX_EXACT_VOCABULARY,
    SupervisedTokenLogits,
    predicting_mask,
    supervised_targets,
)
from flaplace.vocabulary import NextTokenLogits, TokenLogitsFunction, all_logits, vocabulary_predictive
from tests.tiny_models import float64_rms_norm, tiny_base_model

VOCAB = 16


def tiny_llm(vocab: int = VOCAB, seed: int = 0) -> nn.Module:
    """A tiny random Llama (2 layers, hidden 16) with random LoRA (rank 2) on q_proj and v_proj, float64."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(tiny_base_model("llama", vocab=vocab), config).double().eval()


def sft_batch(n: int = 3, length: int = 7, prompt: int = 3, seed: int = 1, vocab: int = VOCAB) -> dict:
    """Token ids with labels = ids, the first ``prompt`` tokens masked (-100); row 2 ends with 2 masked tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    if n > 2:
        labels[2, length - 2 :] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def factors_of(model_fn, params, batches, **options):
    factors, state = fit(model_fn, params, batches, progress=False, lr_threshold=None, **options)
    return {n: (f.S.dense(), f.A.dense()) for n, f in factors.items()}, state


def assert_factors_close(left, right, **tol):
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name][0], right[name][0], **tol)
        torch.testing.assert_close(left[name][1], right[name][1], **tol)


def full_logits(model, params, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return logits_of(functional_call(model, params, (), inputs))


def supervised_log_probs(logits, batch):
    mask = predicting_mask(batch["labels"], batch["attention_mask"])
    rows = logits[mask]
    return torch.log_softmax(rows, -1).gather(1, supervised_targets(batch["labels"], mask)[:, None])[:, 0]


def dense_ggn(model, params, batch, names):
    """The exact GGN of the summed token loss over the flattened ``names``: sum_rows J_r^T Lambda_r J_r."""
    mask = predicting_mask(batch["labels"], batch["attention_mask"])
    flat = torch.cat([params[n].reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def rows(vector):
        pieces = dict(params)
        for name, piece in zip(names, vector.split(sizes), strict=True):
            pieces[name] = piece.reshape(params[name].shape)
        return full_logits(model, pieces, batch)[mask]

    logits = rows(flat).detach()
    jac = jacrev(rows)(flat)  # (n, V, P)
    p = logits.softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("rvp,rvw,rwq->pq", jac, lam, jac)


# ------------------------------------------------------------------ the log-likelihood


def test_log_likelihood_is_the_models_summed_sft_loss():
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    f = ModelFunction(model, params, SupervisedTokenLogits())
    _, state = fit(f, params, [batch], fisher="mc", progress=False)
    with torch.no_grad():
        loss = model(**batch).loss  # Hugging Face: the MEAN over supervised tokens
    count = int((batch["labels"][:, 1:] != -100).sum())
    assert count == 3 * 4 - 2
    torch.testing.assert_close(state.log_likelihood, -loss.double() * count, rtol=1e-6, atol=0)
    with torch.no_grad():
        reference = supervised_log_probs(full_logits(model, params, batch), batch).sum()
    torch.testing.assert_close(state.log_likelihood, reference, rtol=1e-12, atol=1e-12)


def test_supervised_logits_project_only_predicting_positions():
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    f = ModelFunction(model, params, SupervisedTokenLogits())
    assert f.trim_logits  # the head is asked for the predicting positions only
    mask = predicting_mask(batch["labels"], batch["attention_mask"])
    rows = f(params, batch)
    assert rows.shape == (int(mask.sum()), VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(rows, full_logits(model, params, batch)[mask])


def test_integer_positions_fallback(monkeypatch):
    """A transformers without boolean ``logits_to_keep``: padded integer positions give the same rows."""
    import flaplace.tokens as tokens

    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    monkeypatch.setattr(tokens, "_slices_by_mask", lambda: False)
    keep = SupervisedTokenLogits().model_kwargs(batch)["logits_to_keep"]
    assert keep.dtype == torch.long and keep.shape == (3, 4)  # row 2 has 2 positions, padded to 4
    f = ModelFunction(model, params, SupervisedTokenLogits())
    mask = predicting_mask(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(f(params, batch), full_logits(model, params, batch)[mask])


# ------------------------------------------------------------------ K-FAC's exact cases


def test_exact_fisher_equals_dense_ggn_in_an_exact_case():
    """One example whose tokens are all equal, every token supervised: every layer's input is the same at
    every position, so a weight's per-example gradient is (sum_t g_t) a^T and ``reduce`` is exact.

    (The queries do not matter when all keys and values are equal, so q_proj's curvature is zero here;
    v_proj's is not.)"""
    model = tiny_llm()
    params = select_params(model, "lora")
    f = ModelFunction(model, params, SupervisedTokenLogits())

    def batch_of(ids):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    equal, mixed = batch_of(torch.full((1, 6), 5)), batch_of(torch.tensor([[5, 3, 9, 5, 1, 2]]))
    with float64_rms_norm():
        factors, _ = factors_of(f, params, [equal], fisher="exact", sharing="reduce")
        for name in params:
            reference = dense_ggn(model, params, equal, [name])
            if "v_proj" in name:
                assert reference.abs().max() > 1e-4
            S, A = factors[name]
            torch.testing.assert_close(torch.kron(S, A), reference, rtol=1e-9, atol=1e-12)
        # with different tokens the inputs differ between positions: K-FAC approximates
        factors, _ = factors_of(f, params, [mixed], fisher="exact", sharing="reduce")
        name = next(n for n in params if "v_proj.lora_A" in n)
        reference = dense_ggn(model, params, mixed, [name])
        S, A = factors[name]
        assert (torch.kron(S, A) - reference).abs().max() > 1e-3 * reference.abs().max()


class PerPositionLM(nn.Module):
    """A causal LM without attention: logits_t = head(tanh(hidden(embed(x_t)))), so positions never mix."""

    def __init__(self, vocab: int = 12, width: int = 5, hidden: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, hidden, bias=False)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.hidden(self.embed(input_ids))))


def per_position_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = PerPositionLM().double().eval()
    params = {n: p.detach() for n, p in model.named_parameters() if n != "embed.weight"}
    return model, params, ModelFunction(model, params, SupervisedTokenLogits())


def per_position_reference(model, batch):
    """Closed-form expand factors of the per-position model: S sums J_t^T Lambda_t J_t over predicting
    positions t (J_t the logits' Jacobian in the layer output at t alone), A averages a_t a_t^T."""
    mask = predicting_mask(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        embedded = model.embed(batch["input_ids"])[mask]  # (n, width): inputs of `hidden`
        y = embedded @ model.hidden.weight.T
        features = torch.tanh(y)  # inputs of `head`
        p = (features @ model.head.weight.T).softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    jac_y = model.head.weight[None] * (1 - features**2)[:, None, :]  # d logits / d y, (n, V, hidden)
    return {
        "hidden.weight": (
            torch.einsum("rvh,rvw,rwk->hk", jac_y, lam, jac_y),
            embedded.T @ embedded / len(embedded),
        ),
        "head.weight": (lam.sum(0), features.T @ features / len(features)),
    }


def test_per_position_model_matches_closed_form_expand_factors():
    model, params, f = per_position_setup()
    batch = sft_batch(n=3, length=6, prompt=2, vocab=12)
    batch["labels"][0, 3] = -100  # a masked label inside the completion
    factors, state = factors_of(f, params, [batch], fisher="exact", sharing="expand")
    assert_factors_close(factors, per_position_reference(model, batch), rtol=1e-10, atol=1e-12)
    assert int(state.a_count["hidden.weight"]) == int(predicting_mask(batch["labels"]).sum()) == 3 + 4 + 2


def test_one_supervised_token_is_exact():
    """One example with one supervised token in a per-position model: G = g a^T, so S (x) A is the GGN."""
    model, params, f = per_position_setup()
    ids = torch.tensor([[3, 7, 1, 9]])
    labels = torch.tensor([[-100, -100, 1, -100]])  # position 1 predicts the token 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    for sharing in ("expand", "reduce", "last"):
        factors, _ = factors_of(f, params, [batch], fisher="exact", sharing=sharing)
        for name in params:
            S, A = factors[name]
            torch.testing.assert_close(
                torch.kron(S, A), dense_ggn(model, params, batch, [name]), rtol=1e-10, atol=1e-13
            )


# ------------------------------------------------------------------ masking and padding


def test_trailing_masked_tokens_equal_the_truncated_sequence():
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch(n=2, length=8)
    batch["labels"][:, -3:] = -100
    short = {k: v[:, :-3] for k, v in batch.items()}
    f = ModelFunction(model, params, SupervisedTokenLogits())
    with float64_rms_norm():
        for sharing in ("expand", "reduce", "last"):
            long_f, long_state = factors_of(f, params, [batch], fisher="exact", sharing=sharing)
            short_f, short_state = factors_of(f, params, [short], fisher="exact", sharing=sharing)
            assert_factors_close(long_f, short_f, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(
                long_state.log_likelihood, short_state.log_likelihood, rtol=1e-12, atol=0
            )


def test_masking_a_label_removes_its_row_from_the_likelihood():
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    masked = {**batch, "labels": batch["labels"].clone()}
    masked["labels"][1, 4] = -100
    f = ModelFunction(model, params, SupervisedTokenLogits())
    _, state = fit(f, params, [masked], fisher="empirical", progress=False)
    with torch.no_grad():
        rows = supervised_log_probs(full_logits(model, params, batch), batch)
    mask = predicting_mask(batch["labels"])
    dropped = (mask.long().cumsum(1) - 1)[1, 3] + mask[0].sum()  # the row that predicts labels[1, 4]
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[dropped] = False
    torch.testing.assert_close(state.log_likelihood, rows[keep].sum(), rtol=1e-12, atol=0)
    # the dense GGN of the masked batch is the full one without that row's term
    name = next(iter(params))
    one_row = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    one_row["labels"][1, 4] = batch["labels"][1, 4]
    torch.testing.assert_close(
        dense_ggn(model, params, masked, [name]) + dense_ggn(model, params, one_row, [name]),
        dense_ggn(model, params, batch, [name]),
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_nothing(side):
    """Two examples of different lengths padded into one batch give the factors of the two unpadded ones."""
    model = tiny_llm()
    params = select_params(model, "lora")
    a = sft_batch(n=1, length=7, seed=3)
    b = sft_batch(n=1, length=5, seed=4)
    pad = 2
    zeros = torch.zeros(1, pad, dtype=torch.long)
    ignore = torch.full((1, pad), -100)

    def padded(key, fill):
        return torch.cat([fill, b[key]] if side == "left" else [b[key], fill], dim=1)

    together = {
        "input_ids": torch.cat([a["input_ids"], padded("input_ids", zeros + 7)]),
        "attention_mask": torch.cat([a["attention_mask"], padded("attention_mask", zeros)]),
        "labels": torch.cat([a["labels"], padded("labels", ignore)]),
    }
    f = ModelFunction(model, params, SupervisedTokenLogits())
    with float64_rms_norm():
        for sharing in ("expand", "reduce"):
            joint, joint_state = factors_of(f, params, [together], fisher="exact", sharing=sharing)
            apart, apart_state = factors_of(f, params, [a, b], fisher="exact", sharing=sharing)
            assert_factors_close(joint, apart, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(
                joint_state.log_likelihood, apart_state.log_likelihood, rtol=1e-10, atol=0
            )


# ------------------------------------------------------------------ Monte Carlo


def test_mc_converges_to_the_exact_factors():
    """The mean of M one-sample ``mc`` factors is within its sampling error of the exact factors.

    With per-entry standard errors ``se`` estimated from the M draws, the mean squared z-score
    ``mean((mean - exact)^2 / se^2)`` is about 1 for an unbiased estimator; the test asks for < 2
    (fixed seed), and checks that a 50 % error in the reference would be caught (> 10).
    """
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    f = ModelFunction(model, params, SupervisedTokenLogits())
    exact, _ = factors_of(f, params, [batch], fisher="exact")
    init, update = build(f, fisher="mc", lr_threshold=None, generator=torch.Generator().manual_seed(0))
    empty = init(params)
    draws = 300
    samples = {name: [] for name in params}
    for _ in range(draws):
        state = update(empty, params, batch)
        for name in params:
            samples[name].append(state.S[name])
    for name in params:
        stacked = torch.stack(samples[name])
        mean, se = stacked.mean(0), stacked.std(0) / draws**0.5
        keep = se > 1e-12
        S_exact = exact[name][0]
        z2 = (((mean - S_exact)[keep] / se[keep]) ** 2).mean()
        assert z2 < 2.0, (name, float(z2))
        wrong = (((mean - 1.5 * S_exact)[keep] / se[keep]) ** 2).mean()
        assert wrong > 10.0, (name, float(wrong))
        # the input factor does not depend on the Fisher type
        A_mc = state.A[name] / state.a_count[name]
        torch.testing.assert_close(A_mc, exact[name][1])


# ------------------------------------------------------------------ other routes and misuse


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_every_token_logits_function_gives_the_same_factors(fisher):
    """TokenLogitsFunction, ModelFunction(all_logits) and SupervisedTokenLogits agree on token labels."""
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    results = []
    for f in (
        ModelFunction(model, params, SupervisedTokenLogits()),
        TokenLogitsFunction(model, params),
        ModelFunction(model, params, all_logits),
    ):
        results.append(
            factors_of(f, params, [batch], fisher=fisher, generator=torch.Generator().manual_seed(0))
        )
    for factors, state in results[1:]:
        assert_factors_close(factors, results[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state.log_likelihood, results[0][1].log_likelihood)


def one_line_error(error_type, call, match):
    with pytest.raises(error_type, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_misuse_gives_one_line_errors():
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    for fisher in ("exact", "mc", "empirical"):
        message = one_line_error(
            ValueError,
            lambda fisher=fisher: fit(
                ModelFunction(model, params, NextTokenLogits()),
                params,
                [batch],
                fisher=fisher,
                progress=False,
            ),
            "SupervisedTokenLogits",
        )
        assert "(3, 1, 16)" in message
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    one_line_error(
        ValueError,
        lambda: fit(TokenLogitsFunction(model, params), params, [no_labels], progress=False),
        "token labels",
    )
    one_line_error(
        ValueError,
        lambda: ModelFunction(model, params, SupervisedTokenLogits())(params, no_labels),
        "SupervisedTokenLogits needs causal-LM token labels",
    )
    out_of_vocab = {
        **batch,
        "labels": batch["labels"].masked_fill(batch["labels"] == batch["labels"].max(), 99),
    }
    one_line_error(
        ValueError,
        lambda: fit(TokenLogitsFunction(model, params), params, [out_of_vocab], progress=False),
        "outside",
    )
    last_token = ModelFunction(model, params, LastTokenLogits([3, 5]))
    one_line_error(
        ValueError, lambda: fit(last_token, params, [batch], progress=False), "SupervisedTokenLogits"
    )
    empty_row = {**batch, "labels": batch["labels"].clone()}
    empty_row["labels"][1] = -100
    one_line_error(
        ValueError,
        lambda: fit(
            ModelFunction(model, params, SupervisedTokenLogits()),
            params,
            [empty_row],
            sharing="reduce",
            progress=False,
        ),
        "no supervised token",
    )
    # expand: the example simply adds nothing
    fit(ModelFunction(model, params, SupervisedTokenLogits()), params, [empty_row], progress=False)


def test_exact_is_refused_above_the_vocabulary_threshold():
    model = tiny_llm(vocab=MAX_EXACT_VOCABULARY + 1)
    params = select_params(model, "lora")
    batch = sft_batch(vocab=MAX_EXACT_VOCABULARY + 1)
    f = ModelFunction(model, params, SupervisedTokenLogits())
    message = one_line_error(
        ValueError, lambda: fit(f, params, [batch], fisher="exact", progress=False), "fisher='mc'"
    )
    assert "256" in message
    fit(f, params, [batch], fisher="mc", progress=False)  # mc is fine


def test_mc_token_draws_follow_the_softmax():
    """The sampled token of each mc cotangent (``onehot(token) - p``, over ``sqrt(k)``) against ``p = softmax(rows)``.

    A vocabulary of 300 spans one full block of the two-level sampler and a shorter one; rows with
    all their mass on the first or the last token must always draw it.
    """
    g = torch.Generator().manual_seed(0)
    vocab, k = 300, 20000
    rows = torch.randn(3, vocab, generator=g, dtype=torch.float64) * 0.5
    rows[1], rows[2] = -1e4, -1e4
    rows[1, -1], rows[2, 0] = 0.0, 0.0
    probs = rows.softmax(-1)
    count, cotangents = token_cotangents(rows.clone(), "mc", n_samples=k, generator=g)
    draws = torch.stack([(cotangent * k**0.5 + probs).argmax(-1) for cotangent in cotangents])  # (k, 3)
    assert count == k and draws.shape == (k, 3)
    assert (draws[:, 1] == vocab - 1).all() and (draws[:, 2] == 0).all()
    observed = torch.bincount(draws[:, 0], minlength=vocab).double()
    chi2 = float(
        ((observed - k * probs[0]) ** 2 / (k * probs[0])).sum()
    )  # 299 degrees of freedom: mean 299, sd 24.5
    assert chi2 < 299 + 5 * 24.5, chi2


COMPILED_TOKEN_UPDATE = """
import json, torch
from test_kfac_tokens import sft_batch, tiny_llm
from flaplace.compiling import compile_update
from flaplace.kfac import build
from flaplace.params import ModelFunction, select_params
from flaplace.tokens import SupervisedTokenLogits
model = tiny_llm()
params = select_params(model, "lora")
batch = sft_batch()
out = {}
for fisher in ("exact", "mc"):
    init, update = build(ModelFunction(model, params, SupervisedTokenLogits()), fisher=fisher,
                         lr_threshold=None)
    state = init(params, batch)
    fast = compile_update(update, backend="aot_eager", fullgraph=False)
    torch.manual_seed(0)
    got = fast(fast(state, params, batch), params, batch)
    torch.manual_seed(0)
    want = update(update(state, params, batch), params, batch)
    out[fisher] = max(float((getattr(got, s)[n] - getattr(want, s)[n]).norm() / getattr(want, s)[n].norm())
                      for s in ("S", "A") for n in getattr(want, s))
    out[fisher + "_ll"] = abs(float(got.log_likelihood - want.log_likelihood))
print(json.dumps(out))
"""


def test_compiled_update_on_token_labels_equals_the_eager_update():
    """``compile_update(..., fullgraph=False)`` on token labels: the same factors and log-likelihood
    as the eager update (``mc``: the same draws of the global RNG); ``fullgraph=True`` is refused
    in one line before anything is compiled."""
    import json

    from conftest import run_without_typechecks  # here: the script imports this module, without the hook

    result = json.loads(run_without_typechecks(COMPILED_TOKEN_UPDATE, timeout=1200).strip().splitlines()[-1])
    assert result["exact"] < 1e-10 and result["exact_ll"] < 1e-9, result
    assert result["mc"] < 1e-10 and result["mc_ll"] < 1e-9, result
    model = tiny_llm()
    params = select_params(model, "lora")
    init, update = build(ModelFunction(model, params, SupervisedTokenLogits()), fisher="mc")
    one_line_error(
        ValueError,
        lambda: compile_update(update)(init(params), params, sft_batch()),
        "fullgraph=True cannot trace an update on causal-LM token labels.*fullgraph=False",
    )


def test_posterior_evidence_and_predictive_accept_token_factors():
    model = tiny_llm()
    params = select_params(model, "lora")
    batch = sft_batch()
    factors, state = fit(
        ModelFunction(model, params, SupervisedTokenLogits()), params, [batch], progress=False
    )
    posterior = make_posterior(factors, params, 1.0)
    tuned, _ = tune_prior_evidence(posterior, state.log_likelihood)
    assert all(torch.isfinite(v).all() for v in tuned.prior_precision.values())
    f = TokenLogitsFunction(model, params)
    g = torch.Generator().manual_seed(0)
    targets = torch.cat([batch["labels"][:, 1:], torch.full((3, 1), -100)], dim=1)
    pred = vocabulary_predictive(f, tuned, batch, 4, targets=targets, generator=g)
    assert pred.probs.shape == (3, 7, VOCAB) and torch.isfinite(pred.log_predictive).all()
    scores = sequence_scores(f, tuned, batch, batch["labels"] != -100, 4, generator=g)
    assert scores.mean.shape == (3,) and torch.isfinite(scores.mean).all()


def test_laplace_lora_fits_token_labels():
    model = tiny_llm()
    batch = sft_batch()
    la = LaplaceLoRA(model, SupervisedTokenLogits()).fit([batch]).optimize_prior_precision()
    with torch.no_grad():
        loss = model(**batch).loss
    torch.testing.assert_close(la.log_likelihood, -loss.double() * 10, rtol=1e-6, atol=0)
    la_all = LaplaceLoRA(model, all_logits, fisher="exact").fit([batch])
    torch.testing.assert_close(la_all.log_likelihood, la.log_likelihood)
