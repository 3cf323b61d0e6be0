"""Text generation with per-token uncertainty for Hugging Face (PEFT) causal LMs.

Two modes, both returning the text with each generated token's predictive entropy, aleatoric part
and mutual information (the epistemic part):

* ``"weights"``: ``S`` weight-space posterior samples ``theta* + delta_s`` are swapped into the
  adapter weights in turn (and restored afterwards); each keeps its own key/value cache, so a
  step is ``S`` cached one-token forwards. At each step the ``S`` next-token distributions are
  averaged and the next token is taken from the average.
* ``"linearised"``: [`flaplace.linearised_decode`][flaplace.linearised_decode], the linearised model's samples
  ``f(theta*) + J delta_s`` by ``torch.func.jvp``, averaged at each step (no cache: each step
  re-runs the whole sequence).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from flaplace.sequences import linearised_decode
from flaplace.typing import Params, Posterior
from flaplace.vocabulary import NextTokenLogits, TokenLogitsFunction, sample_perturbations


class Generation(NamedTuple):
    """Generated text with per-token uncertainty.

    Attributes:
        text: the generated text (without the prompt).
        tokens: the generated tokens, decoded one by one.
        token_ids: ``(new,)``, their ids.
        entropy: ``(new,)``, the predictive entropy of each step (nats).
        aleatoric: ``(new,)``, the mean entropy of the samples' distributions.
        mutual_information: ``(new,)``, ``entropy - aleatoric``.
    """

    text: str
    tokens: list[str]
    token_ids: Tensor
    entropy: Tensor
    aleatoric: Tensor
    mutual_information: Tensor


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Copy ``weights`` into the model's parameters of the same names for the block; restore them after.

    Examples:
        >>> draw = flaplace.sample(posterior, 1)  # theta* + delta, leaves (1, *shape)
        >>> with swapped_weights(peft_model, {name: w.squeeze(0) for name, w in draw.items()}):
        ...     out = peft_model(input_ids=ids)
    """
    named = dict(model.named_parameters())
    missing = [n for n in weights if n not in named]
    if missing:
        raise ValueError(f"weights: {missing[0]!r} is not a parameter of the model")
    saved = {n: named[n].detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                named[n].copy_(w)
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                named[n].copy_(w)


def _weight_space_decode(
    model: nn.Module,
    posterior: Posterior,
    ids: Tensor,
    *,
    max_new_tokens: int,
    n_samples: int,
    generator: torch.Generator | None,
    do_sample: bool,
    eos_token_id: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    deltas = sample_perturbations(posterior, n_samples, generator)
    draws: list[Params] = [
        {n: posterior.mean[n] + deltas[n][s] for n in posterior.mean} for s in range(n_samples)
    ]
    caches: list[object] = [None] * n_samples
    step_ids = ids
    chosen, entropies, aleatorics, mis = [], [], [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            log_ps = []
            for s in range(n_samples):
                with swapped_weights(model, draws[s]):
                    out = model(input_ids=step_ids, past_key_values=caches[s], use_cache=True)
                caches[s] = out.past_key_values
                log_ps.append(torch.log_softmax(out.logits[0, -1].double(), -1))
            log_p = torch.stack(log_ps)
            p = log_p.exp().mean(0)
            entropy = -(p * p.clamp(min=1e-300).log()).sum()
            aleatoric = -(log_p.exp() * log_p).sum(-1).mean()
            token = torch.multinomial(p, 1, generator=generator)[0] if do_sample else p.argmax()
            chosen.append(token)
            entropies.append(entropy)
            aleatorics.append(aleatoric)
            mis.append((entropy - aleatoric).clamp(min=0))
            step_ids = token.view(1, 1).to(ids.device)
            if eos_token_id is not None and int(token) == eos_token_id:
                break
    return torch.stack(chosen), torch.stack(entropies), torch.stack(aleatorics), torch.stack(mis)


def generate_with_uncertainty(
    model: nn.Module,
    tokenizer: object,
    posterior: Posterior,
    prompt: str,
    *,
    mode: str = "weights",
    n_samples: int = 8,
    max_new_tokens: int = 20,
    generator: torch.Generator | None = None,
    do_sample: bool = False,
) -> Generation:
    """Generate a continuation of ``prompt`` and the uncertainty of every generated token.

    At each step the next-token distributions of ``n_samples`` posterior samples are averaged;
    the token is the average's most probable one (or drawn from it with ``do_sample``), and its
    entropy splits into the samples' mean entropy (aleatoric) and the mutual information
    (epistemic). ``mode="weights"`` swaps weight samples into the adapters (one key/value cache
    per sample; the model is restored afterwards); ``mode="linearised"`` uses the linearised
    model's jvp samples ([`flaplace.linearised_decode`][flaplace.linearised_decode]). Both stop at the tokenizer's EOS.

    Args:
        model: a (PEFT) causal LM whose parameters include the posterior's blocks.
        tokenizer: its Hugging Face tokenizer.
        posterior: from [`flaplace.make_posterior`][flaplace.make_posterior] over the model's adapter weights.
        prompt: the text to continue.
        mode: ``"weights"`` or ``"linearised"``.
        n_samples: posterior samples ``S``.
        max_new_tokens: the most tokens to generate.
        generator: a ``torch.Generator``, for reproducibility.
        do_sample: draw tokens from the averaged distribution instead of taking the most probable.

    Returns:
        A `Generation`.

    Examples:
        >>> out = generate_with_uncertainty(peft_model, tok, posterior, "The capital of France is", n_samples=8)
        >>> list(zip(out.tokens, out.mutual_information.tolist()))
    """
    if mode not in ("weights", "linearised"):
        raise ValueError(f"mode must be 'weights' or 'linearised', got {mode!r}")
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # type: ignore[operator]
    device = next(iter(posterior.mean.values())).device
    ids = ids.to(device)
    eos = getattr(tokenizer, "eos_token_id", None)
    if mode == "weights":
        token_ids, entropy, aleatoric, mi = _weight_space_decode(
            model,
            posterior,
            ids,
            max_new_tokens=max_new_tokens,
            n_samples=n_samples,
            generator=generator,
            do_sample=do_sample,
            eos_token_id=eos,
        )
    else:
        f = TokenLogitsFunction(model, posterior.mean, NextTokenLogits())
        with torch.no_grad():
            out = linearised_decode(
                f,
                posterior,
                ids,
                max_new_tokens=max_new_tokens,
                n_samples=n_samples,
                generator=generator,
                do_sample=do_sample,
                eos_token_id=eos,
            )
        token_ids, entropy, aleatoric, mi = out.tokens, out.entropy, out.aleatoric, out.mutual_information
    decode = tokenizer.decode  # type: ignore[attr-defined]
    return Generation(
        text=decode(token_ids.tolist()),
        tokens=[decode([int(t)]) for t in token_ids],
        token_ids=token_ids,
        entropy=entropy,
        aleatoric=aleatoric,
        mutual_information=mi,
    )
