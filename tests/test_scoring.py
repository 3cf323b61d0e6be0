"""Multiple-choice scoring (cloze with a causal LM, pairs with an encoder's multiple-choice head).

References: token log-probabilities read off the model one sequence at a time; per-example
Jacobians from jacrev of the whole batched function; K-FAC factors from forward hooks and
autograd with explicit loops over examples, choices and positions; the dense GGN in K-FAC's exact
case; the dense ``J Sigma J^T``.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import LORA_TARGETS, float64_rms_norm, tiny_lora_model

from flaplace.fisher import fisher_cotangents
from flaplace.jacobians import per_example_jacobians
from flaplace.kfac import build
from flaplace.kfac_state import dense_block, kfac_factors
from flaplace.params import ModelFunction, classifier_logits, select_params
from flaplace.posterior import make_posterior
from flaplace.predictive import linearised_predictive
from flaplace.scoring import ClozeModelFunction, cloze_batch, cloze_scores, flatten_choices, pair_batch


class IdTokenizer:
    """Text of space-separated integers -> those token ids (pad 0)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


PROMPTS = ["11 12 13", "14 15"]
CHOICES = [["3", "5 6", "7 8 9"], ["20", "21 22", "23"]]
UNCONDITIONAL = "30 31"  # the context of the baseline scores (pointwise mutual information)


def _batch(prompts=PROMPTS, choices=CHOICES, labels=(2, 0), **kw):
    return cloze_batch(IdTokenizer(), prompts, choices, list(labels), **kw)


def _lora_llama(attn: str | None = None):
    model = tiny_lora_model("llama")
    if attn is not None:  # vmap cannot trace sdpa's mask shortcuts
        model.set_attn_implementation(attn)
    return model, select_params(model, "lora")


def test_cloze_batch_layout():
    batch = _batch()
    assert batch["input_ids"].shape == (2, 3, 6)
    assert batch["input_ids"][0, 2].tolist() == [11, 12, 13, 7, 8, 9]
    assert batch["attention_mask"][1, 1].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["choice_positions"][0, 2].tolist() == [2, 3, 4]
    assert batch["choice_tokens"][0, 1].tolist() == [5, 6, 0]
    assert batch["choice_mask"][1, 0].tolist() == [True, False, False]
    truncated = _batch(max_length=4)  # the prompt loses its first tokens, the choice stays whole
    assert truncated["input_ids"][0, 2].tolist() == [13, 7, 8, 9]
    assert truncated["choice_positions"][0, 2].tolist() == [0, 1, 2]


def test_cloze_batch_errors_are_clear():
    with pytest.raises(ValueError, match="same \\(non-zero\\) number of choices"):
        _batch(choices=[["3", "5"], ["20"]])
    with pytest.raises(ValueError, match="same length"):
        cloze_batch(IdTokenizer(), PROMPTS, CHOICES[:1])
    tok = IdTokenizer()
    tok.pad_token_id = None
    with pytest.raises(ValueError, match="pad token"):
        cloze_batch(tok, PROMPTS, CHOICES)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("trim", [True, False])
def test_cloze_logits_are_summed_choice_log_probs(normalize, trim):
    model, params = _lora_llama()
    f = ClozeModelFunction(model, params, normalize=normalize, trim_logits=trim)
    assert f.trim_logits == trim
    batch = _batch()
    got = f(params, batch)
    for b, (prompt, options) in enumerate(zip(PROMPTS, CHOICES, strict=True)):
        head = [int(w) for w in prompt.split()]
        for c, option in enumerate(options):
            tail = [int(w) for w in option.split()]
            ids = torch.tensor([head + tail])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            want = sum(logp[len(head) + k - 1, t] for k, t in enumerate(tail))
            want = want / len(tail) if normalize else want
            assert torch.allclose(got[b, c], want, atol=1e-10), (b, c)


def test_unconditional_batch_appends_baseline_sequences():
    batch = _batch(unconditional=UNCONDITIONAL)
    plain = _batch()
    assert batch["input_ids"].shape[:2] == (2, 6)
    assert batch["choice_baseline"].tolist() == [[3, 4, 5], [3, 4, 5]]
    for key in ("choice_tokens", "choice_mask"):  # the baseline rows score the same choice tokens
        width = plain[key].shape[-1]
        assert torch.equal(batch[key][:, 3:, :width], plain[key]), key
    # example 0, choice 2: "30 31" then "7 8 9"
    assert batch["input_ids"][0, 5][batch["attention_mask"][0, 5].bool()].tolist() == [30, 31, 7, 8, 9]
    assert torch.equal(batch["input_ids"][:, :3, : plain["input_ids"].shape[-1]], plain["input_ids"])


@pytest.mark.parametrize("normalize", [False, True])
def test_unconditional_logits_are_pointwise_mutual_information(normalize):
    """logit_c = log p(choice_c | prompt) - log p(choice_c | unconditional), each read separately."""
    model, params = _lora_llama()
    f = ClozeModelFunction(model, params, normalize=normalize)
    got = f(params, _batch(unconditional=UNCONDITIONAL))
    conditional = f(params, _batch())
    baseline = f(params, _batch(prompts=[UNCONDITIONAL] * 2))
    assert got.shape == (2, 3)
    assert torch.allclose(got, conditional - baseline, atol=1e-10)
    assert (baseline.std(1) > 1e-3).all()  # the baselines differ between choices: they matter


def test_cloze_model_function_rejects_other_batches():
    model, params = _lora_llama()
    f = ClozeModelFunction(model, params)
    with pytest.raises(ValueError, match="cloze_batch"):
        f(params, {"input_ids": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="token logits"):
        cloze_scores(torch.zeros(5, 2, 4), _batch())


@pytest.mark.parametrize("unconditional", [None, UNCONDITIONAL])
@pytest.mark.parametrize("method", ["vmap", "loop", "capture"])
def test_cloze_jacobians_match_jacrev_of_the_batch(method, unconditional):
    model, params = _lora_llama("eager" if method == "vmap" else None)
    f = ClozeModelFunction(model, params)
    batch = _batch(unconditional=unconditional)
    with float64_rms_norm():
        reference = torch.func.jacrev(lambda p: f(p, batch))(params)
        got = per_example_jacobians(f, params, batch, method=method)
    for name, ref in reference.items():
        assert got[name].shape == ref.shape  # (B, C, *shape): example b's C logits
        assert torch.allclose(got[name], ref, atol=1e-9, rtol=1e-7), name


def _hook_factors(model, names, logits_fn, batch, sharing):
    """S and A with forward hooks and autograd, grouping each example's C sequences by hand."""
    modules = dict(model.named_modules())
    inputs, outputs, handles = {}, {}, []
    for name in names:
        module = modules[name.rsplit(".", 1)[0]]

        def keep(mod, args, out, name=name):
            inputs[name], outputs[name] = args[0].detach(), out

        handles.append(module.register_forward_hook(keep))
    try:
        logits = logits_fn(batch)
    finally:
        for h in handles:
            h.remove()
    cotangents = fisher_cotangents(logits.detach(), "categorical", "exact")
    grads = {n: [] for n in names}
    for v in cotangents:
        got = torch.autograd.grad(logits, [outputs[n] for n in names], v, retain_graph=True)
        for n, g in zip(names, got, strict=True):
            grads[n].append(g)
    n_ex, n_ch = batch["input_ids"].shape[:2]
    mask = batch["attention_mask"].reshape(n_ex * n_ch, -1).bool()
    result = {}
    for n in names:
        x = inputs[n] if inputs[n].ndim == 3 else inputs[n][:, None]  # pooled head: one row per pair
        gs = [g if g.ndim == 3 else g[:, None] for g in grads[n]]
        S = torch.zeros(gs[0].shape[-1], gs[0].shape[-1], dtype=logits.dtype)
        A = torch.zeros(x.shape[-1], x.shape[-1], dtype=logits.dtype)
        count = 0
        for b in range(n_ex):
            rows = range(b * n_ch, (b + 1) * n_ch)
            real = [(r, t) for r in rows for t in range(x.shape[1]) if mask[r, t]]
            lasts = [(r, max(t for t in range(x.shape[1]) if mask[r, t])) for r in rows]
            if sharing == "expand":
                for r, t in real:
                    A += torch.outer(x[r, t], x[r, t])
                    count += 1
                    for g in gs:
                        S += torch.outer(g[r, t], g[r, t])
            else:
                where = real if sharing == "reduce" else lasts
                a = sum(x[r, t] for r, t in where) / len(where)
                A += torch.outer(a, a)
                count += 1
                for g in gs:
                    s = sum(g[r, t] for r, t in where)
                    S += torch.outer(s, s)
        result[n] = (S, A / count)
    return result


def _full(eigen):
    return (eigen.vectors * eigen.values) @ eigen.vectors.T


@pytest.mark.parametrize("unconditional", [None, UNCONDITIONAL])
@pytest.mark.parametrize("sharing", ["expand", "reduce", "last"])
def test_cloze_kfac_groups_the_choices_of_an_example(sharing, unconditional):
    """With baseline sequences, all ``2C`` sequences of an example are its positions."""
    model, params = _lora_llama()
    f = ClozeModelFunction(model, params)
    batches = [
        _batch(unconditional=unconditional),
        _batch(["16 17"], [["3", "4 5", "6"]], [1], unconditional=unconditional),
    ]
    init, update = build(f, fisher="exact", sharing=sharing, lr_threshold=None)
    state = init(params)
    for batch in batches:
        state = update(state, params, batch)
    assert int(state.n_examples) == 3
    factors = kfac_factors(state)

    def logits_fn(batch):
        return cloze_scores(model(**flatten_choices(batch)).logits, batch)

    refs = [_hook_factors(model, list(params), logits_fn, b, sharing) for b in batches]
    for name in params:
        S = sum(r[name][0] for r in refs)
        if sharing == "expand":
            tokens = [int(b["attention_mask"].sum()) for b in batches]
        else:
            tokens = [b["input_ids"].shape[0] for b in batches]
        A = sum(r[name][1] * k for r, k in zip(refs, tokens, strict=True)) / sum(tokens)
        assert torch.allclose(_full(factors[name].S), S, atol=1e-10), name
        assert torch.allclose(_full(factors[name].A), A, atol=1e-10), name


def test_cloze_reduce_is_exact_when_every_position_sees_the_same_input():
    """One example, every token the same: each layer's input is the same at every position of
    every choice (attention averages equal values), so ``reduce`` K-FAC equals the GGN block."""
    model, params = _lora_llama()
    f = ClozeModelFunction(model, params)
    batch = _batch(["9 9"], [["9", "9 9", "9 9 9"]], [0])
    with float64_rms_norm():
        init, update = build(f, fisher="exact", sharing="reduce", lr_threshold=None)
        factors = kfac_factors(update(init(params), params, batch))
        jac = torch.func.jacrev(lambda p: f(p, batch))(params)
        p = f(params, batch).detach().softmax(-1)[0]
    lam = torch.diag(p) - torch.outer(p, p)
    assert f(params, batch).std() > 1e-3  # the choices' scores differ
    checked = 0
    for name, j in jac.items():
        j = j[0].reshape(j.shape[1], -1)
        block = j.T @ lam @ j
        approx = dense_block(factors[name])
        if block.norm() > 1e-8:
            assert float((approx - block).norm() / block.norm()) < 1e-9, name
            checked += 1
        else:  # queries: the scores do not depend on them here
            assert approx.norm() < 1e-10, name
    assert checked >= 2


@pytest.mark.parametrize("unconditional", [None, UNCONDITIONAL])
@pytest.mark.parametrize("method", ["vmap", "capture"])
def test_cloze_predictive_covariance_matches_dense(method, unconditional):
    model, params = _lora_llama("eager" if method == "vmap" else None)
    f = ClozeModelFunction(model, params)
    batch = _batch(unconditional=unconditional)
    with float64_rms_norm():
        state = build(f, fisher="exact", lr_threshold=None).init(params)
        state = build(f, fisher="exact", lr_threshold=None).update(state, params, batch)
        posterior = make_posterior(kfac_factors(state), params, prior_precision=0.7)
        f_mu, f_var = linearised_predictive(f, posterior, batch, method=method)
        jac = torch.func.jacrev(lambda p: f(p, batch))(params)
    names = list(params)
    blocks = [dense_block(posterior.factors[n]) for n in names]
    precision = torch.block_diag(*blocks) + 0.7 * torch.eye(
        sum(b.shape[0] for b in blocks), dtype=torch.float64
    )
    sigma = torch.linalg.inv(precision)
    for b in range(2):
        J = torch.cat([jac[n][b].reshape(3, -1) for n in names], dim=1)
        assert torch.allclose(f_var[b], J @ sigma @ J.T, atol=1e-10, rtol=1e-8)
    assert torch.allclose(f_mu, f(params, batch), atol=1e-10)


# ---- encoders: (question, choice) pairs scored by a multiple-choice head ----------------------


class PairTokenizer(IdTokenizer):
    """``tok(first, second)`` -> ``[2] first [3] second [3]``, right-padded, as tensors."""

    def __call__(self, first, second, padding=True, truncation=None, max_length=None, return_tensors="pt"):
        rows = [
            [2, *map(int, a.split()), 3, *map(int, b.split()), 3] for a, b in zip(first, second, strict=True)
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _bert_multiple_choice():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForMultipleChoice

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=48,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = BertForMultipleChoice(config).double()
    model = get_peft_model(model, LoraConfig(r=2, target_modules=LORA_TARGETS["bert"], lora_dropout=0.0))
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    names = [n for n, _ in model.named_parameters() if "lora" in n or n.endswith("classifier.weight")]
    params = select_params(model, lambda n, p: n in names)
    return model, params


def _pairs():
    return pair_batch(PairTokenizer(), ["11 12", "13"], [["5", "6 7", "8"], ["9 10", "4", "5"]], [1, 2])


def test_pair_batch_layout():
    batch = _pairs()
    assert batch["input_ids"].shape == (2, 3, 7)
    assert batch["input_ids"][0, 1].tolist() == [2, 11, 12, 3, 6, 7, 3]
    assert batch["labels"].tolist() == [1, 2]


@pytest.mark.parametrize("sharing", ["expand", "reduce", "last"])
def test_pair_scoring_kfac_matches_hooks(sharing):
    model, params = _bert_multiple_choice()
    f = ModelFunction(model, params, classifier_logits)
    batch = _pairs()
    init, update = build(f, fisher="exact", sharing=sharing, lr_threshold=None)
    factors = kfac_factors(update(init(params), params, batch))

    def logits_fn(batch):
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    ref = _hook_factors(model, list(params), logits_fn, batch, sharing)
    assert any("classifier" in n for n in params)
    for name in params:
        S, A = ref[name]
        assert torch.allclose(_full(factors[name].S), S, atol=1e-10), name
        assert torch.allclose(_full(factors[name].A), A, atol=1e-10), name


@pytest.mark.parametrize("method", ["loop", "capture"])
def test_pair_scoring_jacobians_and_predictive(method):
    model, params = _bert_multiple_choice()
    f = ModelFunction(model, params, classifier_logits)
    batch = _pairs()
    reference = torch.func.jacrev(lambda p: f(p, batch))(params)
    got = per_example_jacobians(f, params, batch, method=method)
    for name, ref in reference.items():
        assert torch.allclose(got[name], ref, atol=1e-10), name
