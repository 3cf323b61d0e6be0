"""The full-vocabulary predictive by forward-mode sampling, sequence scoring and linearised decoding.

References are independent of the code under test: the dense Jacobian of every logit from
``jacrev`` and the dense block covariance ``inv(kron(S, A) + lambda I)`` (so the linearised logits
of one perturbation are ``f + J delta`` as a plain matrix product), ``flaplace.linearised_predictive``
for ``C`` answer logits, and explicit loops over samples and sequences. Monte Carlo comparisons
use tolerances of 5 standard errors computed from the number of samples.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import float64_rms_norm, tiny_lora_model
from torch.func import jacrev
from torch.utils._python_dispatch import TorchDispatchMode

from flaplace.params import LastTokenLogits, ModelFunction, select_params
from flaplace.posterior import covariance_dense, make_posterior
from flaplace.predictive import linearised_predictive
from flaplace.sequences import continuation_targets, linearised_decode, sequence_scores
from flaplace.typing import Eigen, KronFactor, Posterior
from flaplace.vocabulary import (
    IGNORE_INDEX,
    NextTokenLogits,
    TokenLogitsFunction,
    linearised_logits,
    sample_perturbations,
    vocabulary_predictive,
)

F64 = torch.float64
VOCAB = 48


def random_posterior(
    params: dict[str, torch.Tensor], prior_precision: float = 4.0, seed: int = 5
) -> Posterior:
    """A posterior with random eigen-form factors; the ``S`` factors are thin (rank 1) to exercise the complement."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, p in params.items():
        o, i = p.shape

        def eigen(d: int, k: int) -> Eigen:
            q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))
            return Eigen(q, 20.0 * torch.rand(k, generator=g, dtype=F64) + 0.1)

        factors[name] = KronFactor(S=eigen(o, 1), A=eigen(i, min(i, 3)), transposed=torch.tensor(False))
    return make_posterior(factors, params, prior_precision)


@pytest.fixture(scope="module")
def setup():
    model = tiny_lora_model("llama", dtype=F64)
    params = select_params(model, "lora")
    posterior = random_posterior(params)
    g = torch.Generator().manual_seed(7)
    batch = {"input_ids": torch.randint(1, VOCAB, (2, 5), generator=g)}
    with float64_rms_norm():  # exact float64 arithmetic, so that jvp and jacrev agree to 1e-10
        yield model, params, posterior, batch


_JACOBIANS: dict[tuple, torch.Tensor] = {}


def dense_jacobian(f, params, batch) -> torch.Tensor:
    """``d f / d theta`` as one ``(*out, P)`` matrix, parameters flattened row-major in posterior order (memoised)."""
    fn = f.output_fn
    name = getattr(fn, "__name__", type(fn).__name__)
    key = (id(f.model), name, str(getattr(fn, "token_ids", None)), batch["input_ids"].numpy().tobytes())
    if key not in _JACOBIANS:
        jac = jacrev(lambda p: f(p, batch))(params)
        out_shape = f(params, batch).shape
        _JACOBIANS[key] = torch.cat([jac[n].reshape(*out_shape, -1) for n in params], dim=-1)
    return _JACOBIANS[key]


def flat(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d.reshape(d.shape[0], -1) for d in deltas.values()], dim=-1)


def dense_covariance(posterior: Posterior) -> torch.Tensor:
    return torch.block_diag(*[covariance_dense(posterior, n) for n in posterior.mean])


# ------------------------------------------------------------------------------------------ sampling


def test_perturbations_have_the_posterior_covariance(setup) -> None:
    _, params, posterior, _ = setup
    name = next(iter(params))
    n = 20000
    deltas = sample_perturbations(posterior, n, torch.Generator().manual_seed(0))
    x = deltas[name].reshape(n, -1)
    sigma = covariance_dense(posterior, name)
    empirical = x.T @ x / n  # the mean is known to be 0
    # 5 standard errors of each second-moment entry: var(x_a x_b) = S_aa S_bb + S_ab^2 for a Gaussian.
    d = torch.diagonal(sigma)
    se = ((d[:, None] * d[None, :] + sigma**2) / n).sqrt()
    assert bool(((empirical - sigma).abs() <= 5 * se).all())
    assert x.mean(0).abs().max() <= 5 * (d.max() / n).sqrt()


def test_perturbations_are_reproducible_and_prefix_stable(setup) -> None:
    _, _, posterior, _ = setup
    a = sample_perturbations(posterior, 5, torch.Generator().manual_seed(3))
    b = sample_perturbations(posterior, 2, torch.Generator().manual_seed(3))
    for name in a:
        # the same standard-normal draws; the batched products round differently with the count
        torch.testing.assert_close(a[name][:2], b[name], rtol=1e-12, atol=1e-14)
        assert not torch.allclose(a[name][0], a[name][1])
    with pytest.raises(ValueError, match="n_samples"):
        sample_perturbations(posterior, 0)


# ------------------------------------------------------------------------------------------ the jvp samples


def test_jvp_tangents_equal_dense_jacobian_products(setup) -> None:
    model, params, posterior, batch = setup
    f = TokenLogitsFunction(model, params)
    deltas = sample_perturbations(posterior, 3, torch.Generator().manual_seed(1))
    primal, tangents = linearised_logits(f, posterior.mean, batch, deltas)
    jac = dense_jacobian(f, params, batch)  # (B, T, V, P)
    reference = torch.einsum("btvp,sp->sbtv", jac, flat(deltas))
    torch.testing.assert_close(tangents, reference, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(primal, f(params, batch), rtol=1e-12, atol=1e-12)


def test_samples_restricted_to_answer_logits_converge_to_linearised_predictive(setup) -> None:
    model, params, posterior, batch = setup
    answers = [3, 5, 7]
    f_all = TokenLogitsFunction(model, params)
    n = 4000
    deltas = sample_perturbations(posterior, n, torch.Generator().manual_seed(2))
    primal, tangents = linearised_logits(f_all, posterior.mean, batch, deltas)
    x = (primal + tangents)[:, :, -1, answers]  # (S, B, C): the last position's answer logits
    f_mu, f_var = linearised_predictive(
        ModelFunction(model, params, LastTokenLogits(answers)), posterior, batch
    )
    # the dense reference: jacrev of the answer logits and the block-diagonal dense covariance
    jac = dense_jacobian(ModelFunction(model, params, LastTokenLogits(answers)), params, batch)
    dense_var = jac @ dense_covariance(posterior) @ jac.mT
    torch.testing.assert_close(f_var, dense_var, rtol=1e-8, atol=1e-10)
    d = torch.diagonal(f_var, dim1=-2, dim2=-1)
    assert bool(((x.mean(0) - f_mu).abs() <= 5 * (d / n).sqrt()).all())
    centred = x - f_mu
    cov = torch.einsum("sbc,sbd->bcd", centred, centred) / n
    se = ((d[..., :, None] * d[..., None, :] + f_var**2) / n).sqrt()
    assert bool(((cov - f_var).abs() <= 5 * se).all())


# ------------------------------------------------------------------------------------------ the predictive


def reference_predictive(f, params, posterior, batch, deltas, targets):
    """The predictive from the dense Jacobian and an explicit loop over samples."""
    jac = dense_jacobian(f, params, batch)
    mu = f(params, batch)
    probs, entropies, picked = [], [], []
    for delta in flat(deltas):
        log_p = torch.log_softmax(mu + jac @ delta, -1)
        probs.append(log_p.exp())
        entropies.append(-(log_p.exp() * log_p).sum(-1))
        safe = targets.clamp(min=0)
        picked.append(log_p.gather(-1, safe[..., None])[..., 0] * (targets != IGNORE_INDEX))
    p = torch.stack(probs).mean(0)
    entropy = -(p * p.log()).sum(-1)
    aleatoric = torch.stack(entropies).mean(0)
    return p, entropy, aleatoric, torch.stack(picked)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_predictive_matches_explicit_loop(setup, chunk_size) -> None:
    model, params, posterior, batch = setup
    f = TokenLogitsFunction(model, params)
    targets = continuation_targets(batch["input_ids"], torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]))
    pred = vocabulary_predictive(
        f,
        posterior,
        batch,
        7,
        targets=targets,
        generator=torch.Generator().manual_seed(4),
        chunk_size=chunk_size,
    )
    deltas = sample_perturbations(posterior, 7, torch.Generator().manual_seed(4))
    p, entropy, aleatoric, picked = reference_predictive(f, params, posterior, batch, deltas, targets)
    torch.testing.assert_close(pred.probs, p, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pred.entropy, entropy, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pred.aleatoric, aleatoric, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pred.mutual_information, entropy - aleatoric, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(pred.target_log_probs, picked, rtol=1e-9, atol=1e-12)
    keep = targets != IGNORE_INDEX
    expected = torch.where(keep, p.gather(-1, targets.clamp(min=0)[..., None])[..., 0].log(), 0.0)
    torch.testing.assert_close(pred.log_predictive, expected, rtol=1e-9, atol=1e-12)
    map_p = torch.softmax(f(params, batch), -1)
    torch.testing.assert_close(pred.map_entropy, -(map_p * map_p.log()).sum(-1))


def test_entropy_identities(setup) -> None:
    model, params, posterior, batch = setup
    f = TokenLogitsFunction(model, params)
    pred = vocabulary_predictive(f, posterior, batch, 8, generator=torch.Generator().manual_seed(0))
    assert bool((pred.mutual_information >= 0).all())
    assert float(pred.mutual_information.max()) > 1e-4  # a real posterior: the samples disagree
    assert bool((pred.entropy <= math.log(VOCAB) + 1e-9).all())
    assert bool((pred.aleatoric <= pred.entropy + 1e-12).all())
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(2, 5, dtype=F64))
    one = vocabulary_predictive(f, posterior, batch, 1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one.mutual_information, torch.zeros(2, 5, dtype=F64), atol=1e-12, rtol=0)
    # a nearly certain posterior (huge prior precision): the MAP's softmax and no epistemic part
    tight = posterior._replace(prior_precision={n: torch.tensor(1e12, dtype=F64) for n in params})
    sharp = vocabulary_predictive(f, tight, batch, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sharp.probs, torch.softmax(f(params, batch), -1), rtol=1e-5, atol=1e-8)
    assert float(sharp.mutual_information.max()) < 1e-8


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("n_samples", [2, 6])
def test_no_vocabulary_squared_tensor_and_size_does_not_grow_with_samples(setup, n_samples) -> None:
    model, params, posterior, batch = setup
    f = TokenLogitsFunction(model, params)
    logits_numel = 2 * 5 * VOCAB
    with ShapeRecorder() as recorder:
        vocabulary_predictive(
            f, posterior, batch, n_samples, generator=torch.Generator().manual_seed(0), chunk_size=1
        )
    largest = max(math.prod(s) for s in recorder.shapes)
    weights = max(p.numel() for p in model.parameters())  # the embedding, (V, hidden)
    # chunk_size=1: nothing bigger than one logits tensor (or a weight), whatever S is
    assert largest <= max(logits_numel, weights)
    assert not any(s.count(VOCAB) >= 2 for s in recorder.shapes)
    with ShapeRecorder() as recorder:
        vocabulary_predictive(
            f, posterior, batch, n_samples, generator=torch.Generator().manual_seed(0), chunk_size=None
        )
    assert (
        max(math.prod(s) for s in recorder.shapes) == n_samples * logits_numel
    )  # unchunked: S logits tensors


def test_predictive_errors_are_clear(setup) -> None:
    model, params, posterior, batch = setup
    f = TokenLogitsFunction(model, params)
    with pytest.raises(ValueError, match="n_samples"):
        vocabulary_predictive(f, posterior, batch, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocabulary_predictive(f, posterior, batch, 2, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        vocabulary_predictive(f, posterior, batch, 2, targets=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="all_logits"):
        vocabulary_predictive(ModelFunction(model, params, LastTokenLogits([3, 5])), posterior, batch, 2)


# ------------------------------------------------------------------------------------------ sequences


def test_continuation_targets() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [0, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    expected = torch.tensor([[-100, 7, 8, -100], [-100, -100, 7, -100]])
    assert torch.equal(continuation_targets(ids, mask), expected)


def test_sequence_scores_match_explicit_loop(setup) -> None:
    model, params, posterior, batch = setup
    f = TokenLogitsFunction(model, params)
    ids = batch["input_ids"]
    answer = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    n = 6
    scores = sequence_scores(
        f, posterior, {"input_ids": ids}, answer, n, generator=torch.Generator().manual_seed(9)
    )
    normed = sequence_scores(
        f,
        posterior,
        {"input_ids": ids},
        answer,
        n,
        generator=torch.Generator().manual_seed(9),
        normalise=True,
    )
    deltas = sample_perturbations(posterior, n, torch.Generator().manual_seed(9))
    jac = dense_jacobian(f, params, {"input_ids": ids})
    mu = f(params, {"input_ids": ids})
    samples = torch.zeros(n, 2, dtype=F64)
    per_token = torch.zeros(n, 2, 5, VOCAB, dtype=F64)
    for s, delta in enumerate(flat(deltas)):
        log_p = torch.log_softmax(mu + jac @ delta, -1)
        per_token[s] = log_p.exp()
        for b in range(2):
            for t in range(1, 5):
                if answer[b, t]:
                    samples[s, b] += log_p[b, t - 1, ids[b, t]]
    torch.testing.assert_close(scores.samples, samples)
    torch.testing.assert_close(scores.mean, samples.mean(0))
    torch.testing.assert_close(scores.std, samples.std(0))
    torch.testing.assert_close(scores.log_mean_prob, samples.exp().mean(0).log())
    p = per_token.mean(0)
    token_pred = torch.stack(
        [sum(p[b, t - 1, ids[b, t]].log() for t in range(1, 5) if answer[b, t]) for b in range(2)]
    )
    torch.testing.assert_close(scores.token_predictive, token_pred)
    map_log_p = torch.log_softmax(mu, -1)
    map_score = torch.stack(
        [sum(map_log_p[b, t - 1, ids[b, t]] for t in range(1, 5) if answer[b, t]) for b in range(2)]
    )
    torch.testing.assert_close(scores.map_score, map_score)
    assert torch.equal(scores.num_tokens, torch.tensor([2, 3]))
    torch.testing.assert_close(normed.samples, samples / torch.tensor([2.0, 3.0], dtype=F64))
    # Jensen: the log of the mean probability is at least the mean log-probability
    assert bool((scores.log_mean_prob >= scores.mean - 1e-12).all())
    with pytest.raises(ValueError, match="answer_mask"):
        sequence_scores(f, posterior, {"input_ids": ids}, torch.zeros_like(ids), 2)


# ------------------------------------------------------------------------------------------ decoding


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=ids).logits[0, -1].argmax()
            out.append(token)
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return torch.stack(out)


def test_linearised_decoding_with_a_certain_posterior_is_greedy(setup) -> None:
    model, params, posterior, batch = setup
    f = TokenLogitsFunction(model, params, NextTokenLogits())
    prompt = batch["input_ids"][:1]
    tight = posterior._replace(prior_precision={n: torch.tensor(1e12, dtype=F64) for n in params})
    out = linearised_decode(
        f, tight, prompt, max_new_tokens=3, n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out.tokens, greedy(model, prompt, 3))
    assert float(out.mutual_information.max()) < 1e-8
    loose = linearised_decode(
        f, posterior, prompt, max_new_tokens=3, n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    again = linearised_decode(
        f, posterior, prompt, max_new_tokens=3, n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(loose.tokens, again.tokens) and torch.equal(
        loose.mutual_information, again.mutual_information
    )
    assert float(loose.mutual_information.max()) > 1e-4
    # each step's numbers are those of the predictive over the sequence so far
    ids = torch.cat([prompt, loose.tokens[:2].view(1, -1)], dim=1)
    deltas = sample_perturbations(posterior, 3, torch.Generator().manual_seed(0))
    step = vocabulary_predictive(
        TokenLogitsFunction(model, params), posterior, {"input_ids": ids}, perturbations=deltas
    )
    torch.testing.assert_close(loose.mutual_information[2], step.mutual_information[0, -1])
    torch.testing.assert_close(loose.prob[2], step.probs[0, -1, loose.tokens[2]])
    sampled = linearised_decode(
        f,
        posterior,
        prompt,
        max_new_tokens=2,
        n_samples=2,
        generator=torch.Generator().manual_seed(1),
        do_sample=True,
    )
    assert sampled.tokens.shape == (2,)
    stop = int(loose.tokens[1])
    short = linearised_decode(
        f,
        posterior,
        prompt,
        max_new_tokens=3,
        n_samples=3,
        generator=torch.Generator().manual_seed(0),
        eos_token_id=stop,
    )
    assert torch.equal(short.tokens, loose.tokens[: list(loose.tokens).index(stop) + 1])
    with pytest.raises(ValueError, match="input_ids"):
        linearised_decode(f, posterior, batch["input_ids"], max_new_tokens=2)
