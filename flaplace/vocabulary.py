"""The full-vocabulary linearised predictive by forward-mode sampling, and sequence scoring.

The linearised model ``f(theta) ~ f(theta*) + J (theta - theta*)`` with the Laplace posterior
``theta - theta* ~ N(0, Sigma)`` gives Gaussian logits at every position and every vocabulary
entry. Their ``(V x V)`` covariance per position is far too large to form, but samples are cheap:

* draw ``delta_s ~ N(0, Sigma)`` block by block in the posterior's Kronecker eigenbasis
  (`sample_perturbations`);
* one forward-mode product ``torch.func.jvp`` of the model function at ``theta*`` along
  ``delta_s`` gives ``f(theta*) + J delta_s``, the logits of one linearised model, for every
  position and vocabulary entry at once;
* with ``p_s = softmax(f(theta*) + J delta_s)``: the predictive ``p = mean_s p_s``, its entropy
  ``H[p]`` (total uncertainty), the mean entropy ``mean_s H[p_s]`` (aleatoric) and their
  difference, the mutual information between the next token and the weights (epistemic,
  never negative since entropy is concave).

Samples are processed ``chunk_size`` at a time and only running sums are kept, so peak memory
is a few ``(batch, tokens, vocab)`` tensors per sample in a chunk and does not grow with the
number of samples. Nothing of size ``V x V`` is ever formed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import jvp, vmap

from flaplace.params import ModelFunction, OutputFn, logits_of
from flaplace.posterior import sqrt_covariance_times
from flaplace.predictive import Directions, check_directions
from flaplace.typing import Batch, KronFactor, Params, Posterior

#: Target value that marks a position without a target (Hugging Face's convention).
IGNORE_INDEX = -100

ModelFn = Callable[[Params, Batch], Tensor]


# --------------------------------------------------------------------------- output functions


def all_logits(output: object, batch: Batch) -> Float[Tensor, "batch tokens vocab"]:
    """Output function: every position's logits ``(batch, tokens, vocab)`` of a causal LM.

    Use it with [`ModelFunction`][flaplace.ModelFunction] to get the model function that
    `vocabulary_predictive` needs.

    Examples:
        >>> f = ModelFunction(peft_model, select_params(peft_model, "lora"), all_logits)
        >>> f(params, {"input_ids": ids}).shape  # (batch, tokens, vocab)
    """
    logits = logits_of(output)
    if logits.ndim != 3:
        raise ValueError(f"expected token logits (batch, tokens, vocab), got {tuple(logits.shape)}")
    return logits


class NextTokenLogits:
    """Output function: the logits at the final position only, ``(batch, 1, vocab)``.

    For decoding: with a [`ModelFunction`][flaplace.ModelFunction] it asks Hugging Face models for
    ``logits_to_keep=1``, so the head projects one position per example. Prompts must be
    left-padded (the final position is the next token's).

    Examples:
        >>> f = ModelFunction(peft_model, params, NextTokenLogits())
        >>> f(params, {"input_ids": ids}).shape  # (batch, 1, vocab)
    """

    def __call__(self, output: object, batch: Batch) -> Float[Tensor, "batch 1 vocab"]:
        return all_logits(output, batch)[:, -1:]

    def model_kwargs(self, batch: Batch) -> dict[str, int]:
        """Hugging Face's ``logits_to_keep``: keep only the final position.

        Examples:
            >>> NextTokenLogits().model_kwargs({"input_ids": ids})
            {'logits_to_keep': 1}
        """
        return {"logits_to_keep": 1}


class TokenLogitsFunction(ModelFunction):
    """``f(params, batch) -> logits (batch, tokens, vocab)``: a [`ModelFunction`][flaplace.ModelFunction] for token logits.

    The same swap of the adapted weights through ``functional_call``, for output functions that
    keep the token axis (`all_logits`, the default, or `NextTokenLogits`), as
    `vocabulary_predictive`, `sequence_scores` and `linearised_decode` need.

    Examples:
        >>> f = TokenLogitsFunction(peft_model, select_params(peft_model, "lora"))
        >>> f(params, {"input_ids": ids}).shape  # (batch, tokens, vocab)
    """

    def __init__(self, model: nn.Module, params: Params, output_fn: OutputFn = all_logits):
        super().__init__(model, params, output_fn)

    def __call__(self, params: Params, batch: Batch) -> Float[Tensor, "batch tokens vocab"]:
        return self.evaluate(params, batch)  # in eval mode, like every model function


# --------------------------------------------------------------------------- sampling


def _informed_sqrt_covariance_times(factor: KronFactor, prior_precision: Tensor, z: Tensor) -> Tensor:
    """``Sigma_informed^{1/2} Z``: only the eigen-directions with ``s_i a_j > lambda``, each scaled by ``(s_i a_j + lambda)^{-1/2}``."""
    q_s, s = factor.S
    q_a, a = factor.A
    eig = s.clamp(min=0)[:, None] * a.clamp(min=0)[None, :]
    scale = torch.where(eig > prior_precision, (eig + prior_precision).rsqrt(), torch.zeros_like(eig))
    return q_s @ (scale * (q_s.mT @ z @ q_a)) @ q_a.mT


def _draws(
    posterior: Posterior, count: int, generator: torch.Generator | None, directions: Directions = "all"
) -> Params:
    """``count`` perturbations; sample ``k`` depends only on the generator's state before it."""
    zs: dict[str, list[Tensor]] = {name: [] for name in posterior.mean}
    for _ in range(count):
        for name in posterior.mean:
            factor = posterior.factors[name]
            o, i = factor.S.vectors.shape[0], factor.A.vectors.shape[0]
            values = factor.S.values
            zs[name].append(
                torch.randn((o, i), generator=generator, dtype=values.dtype, device=values.device)
            )
    times = _informed_sqrt_covariance_times if directions == "informed" else sqrt_covariance_times
    out: Params = {}
    for name, mean in posterior.mean.items():
        factor = posterior.factors[name]
        delta = times(factor, posterior.prior_precision[name].reshape(()), torch.stack(zs[name]))
        if bool(factor.transposed):
            delta = delta.mT
        out[name] = delta.to(mean.dtype)
    return out


def sample_perturbations(
    posterior: Posterior,
    n_samples: int,
    generator: torch.Generator | None = None,
    *,
    directions: Directions = "all",
) -> Params:
    """Draw ``delta_s ~ N(0, Sigma)``, the weight perturbations of the posterior (not ``theta* + delta``).

    Per block (a weight of shape ``(o, i)``) with ``Z`` standard normal of that shape and
    precision eigenvalues ``s_i a_j + lambda`` on the span of the eigenbases ``Q_S, Q_A``
    and ``lambda`` outside it, ``directions="all"`` (default) draws from the whole Laplace
    posterior::

        delta = Q_S [(Q_S^T Z Q_A) / sqrt(s a^T + lambda)] Q_A^T + (Z - Q_S Q_S^T Z Q_A Q_A^T) / sqrt(lambda)

    ``directions="informed"`` draws only along the eigen-directions where the data outweigh the
    prior (``s_i a_j > lambda``), from ``N(0, sum_{k: e_k > lambda} v_k v_k^T / (e_k + lambda))``,
    the covariance that ``predictive_precompute(posterior, directions="informed")`` gives the
    linearised predictive::

        delta = Q_S [(Q_S^T Z Q_A) * 1{s a^T > lambda} / sqrt(s a^T + lambda)] Q_A^T

    so the sampled and the closed-form predictive keep the same directions. Both use the same
    ``Z``: the same generator state gives draws of the two kinds built from the same noise.

    Sample ``k`` is drawn from the generator after samples ``0..k-1`` (block by block in the
    posterior's order), so the first ``m`` of ``n`` samples equal ``m`` samples drawn from a
    generator in the same state.

    Args:
        posterior: from [`make_posterior`][flaplace.make_posterior].
        n_samples: number of samples (positive).
        generator: a ``torch.Generator`` on the factors' device, for reproducibility.
        directions: ``"all"`` (the Laplace posterior) or ``"informed"`` (only the directions
            the data inform; see `predictive_precompute`).

    Returns:
        A dict with the posterior's names; each leaf has shape ``(n_samples, *param.shape)``
        and the dtype of the MAP parameter.

    Raises:
        ValueError: ``n_samples`` not a positive integer, or unknown ``directions``.

    Examples:
        >>> deltas = sample_perturbations(posterior, 4, torch.Generator().manual_seed(0))
        >>> deltas["model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape  # (4, r, hidden)
        >>> informed = sample_perturbations(posterior, 4, directions="informed")
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    check_directions(directions)
    return _draws(posterior, n_samples, generator, directions)


# --------------------------------------------------------------------------- forward-mode samples


@contextlib.contextmanager
def _forward_ad_attention() -> Iterator[None]:
    """Use the math kernel of ``scaled_dot_product_attention``: the fused CPU and CUDA kernels lack forward AD."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def linearised_logits(
    model_fn: ModelFn, mean: Params, batch: Batch, perturbations: Params
) -> tuple[Float[Tensor, "..."], Float[Tensor, "samples ..."]]:
    """``f(theta*)`` and ``J delta_s`` for a stack of perturbations: one ``vmap`` of ``torch.func.jvp``.

    The primal is computed once (it does not depend on the sample); the tangents are batched.
    The linearised logits of sample ``s`` are ``f + tangents[s]``.

    Args:
        model_fn: ``f(params, batch) -> logits``, any output shape (e.g. `all_logits`).
        mean: the weights ``theta*`` at which to linearise.
        batch: the inputs.
        perturbations: leaves of shape ``(samples, *param.shape)`` (`sample_perturbations`).

    Examples:
        >>> f_mu, tangents = linearised_logits(f, posterior.mean, batch, sample_perturbations(posterior, 2))
        >>> tangents.shape  # (2, batch, tokens, vocab)
    """

    def one(delta: Params) -> tuple[Tensor, Tensor]:
        out = jvp(lambda p: model_fn(p, batch), (mean,), (delta,))
        return out[0], out[1]

    with _forward_ad_attention():
        primal, tangents = vmap(one, out_dims=(None, 0))(perturbations)  # type: ignore[arg-type]
    return primal, tangents


class VocabularyPredictive(NamedTuple):
    """The full-vocabulary linearised predictive of one batch, from ``S`` samples.

    Attributes:
        probs: ``(batch, tokens, vocab)``, the predictive ``p = mean_s softmax(f + J delta_s)``.
        entropy: ``(batch, tokens)``, ``H[p]`` in nats (total uncertainty).
        aleatoric: ``(batch, tokens)``, ``mean_s H[p_s]``.
        mutual_information: ``(batch, tokens)``, ``H[p] - mean_s H[p_s]`` (epistemic; clamped at 0
            against round-off).
        map_entropy: ``(batch, tokens)``, the entropy of ``softmax(f(theta*))``.
        target_log_probs: ``(samples, batch, tokens)``, ``log p_s[target]`` per sample (0 where the
            target is ignored), or ``None`` without targets.
        log_predictive: ``(batch, tokens)``, ``log p[target]`` (0 where ignored), or ``None``.
        map_log_probs: ``(batch, tokens)``, ``log softmax(f(theta*))[target]`` (0 where ignored),
            or ``None``.
    """

    probs: Tensor
    entropy: Tensor
    aleatoric: Tensor
    mutual_information: Tensor
    map_entropy: Tensor
    target_log_probs: Tensor | None
    log_predictive: Tensor | None
    map_log_probs: Tensor | None = None


def _entropy(log_p: Tensor) -> Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    start = 0
    while start < n:
        yield start, min(n, start + size)
        start += size


def vocabulary_predictive(
    model_fn: ModelFn,
    posterior: Posterior,
    batch: Batch,
    n_samples: int = 16,
    *,
    targets: Int[Tensor, "batch tokens"] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 8,
    perturbations: Params | None = None,
    directions: Directions = "all",
) -> VocabularyPredictive:
    """The full-vocabulary linearised predictive by forward-mode sampling.

    For each of ``n_samples`` perturbations ``delta_s ~ N(0, Sigma)``, one ``torch.func.jvp`` of
    ``model_fn`` at the posterior mean gives the linearised logits ``f(theta*) + J delta_s`` at
    every position and vocabulary entry; their softmaxes are averaged. Samples go through
    ``chunk_size`` at a time (one vectorised ``jvp`` per chunk) and only running sums are
    kept, so peak memory is about ``4 * chunk_size + 3`` logits tensors of the batch whatever
    ``n_samples`` is.

    Args:
        model_fn: ``f(params, batch) -> logits (batch, tokens, vocab)``, e.g.
            ``ModelFunction(model, params, all_logits)``.
        posterior: from [`make_posterior`][flaplace.make_posterior].
        batch: the inputs.
        n_samples: the number of samples ``S`` (ignored when ``perturbations`` is given).
        targets: ``(batch, tokens)`` token ids whose log-probabilities to return (the token each
            position predicts, i.e. the input shifted by one), `IGNORE_INDEX` where none.
        generator: a ``torch.Generator`` on the factors' device, for reproducibility.
        chunk_size: samples per vectorised ``jvp``; ``None``: all at once (fastest, memory grows
            with ``S``).
        perturbations: pre-drawn perturbations (leaves ``(S, *param.shape)``), e.g. to reuse the
            same linearised models at every step of decoding.
        directions: which posterior the perturbations are drawn from: ``"all"`` (the Laplace
            posterior) or ``"informed"`` (only the directions the data inform), as in
            `sample_perturbations`; ignored with ``perturbations``.

    Returns:
        A `VocabularyPredictive`.

    Examples:
        >>> f = ModelFunction(peft_model, params, all_logits)
        >>> pred = vocabulary_predictive(f, posterior, batch, 16, generator=torch.Generator().manual_seed(0))
        >>> pred.mutual_information.shape  # (batch, tokens): the epistemic part per token
    """
    n_samples = check_sampling_options(n_samples, chunk_size, perturbations, directions)
    size = n_samples if chunk_size is None else chunk_size
    mean = posterior.mean
    prob_sum: Tensor | None = None
    entropy_sum: Tensor | None = None
    map_entropy: Tensor | None = None
    target_rows: list[Tensor] = []
    safe_targets = keep = map_picked = None
    for start, stop in _chunks(n_samples, size):
        if perturbations is not None:
            deltas = {k: v[start:stop] for k, v in perturbations.items()}
        else:
            deltas = _draws(posterior, stop - start, generator, directions)
        primal, tangents = linearised_logits(model_fn, mean, batch, deltas)
        if primal.ndim != 3:
            raise ValueError(
                f"model_fn must return logits (batch, tokens, vocab), got {tuple(primal.shape)}; "
                "use the all_logits output function"
            )
        if map_entropy is None:
            map_log_p = torch.log_softmax(primal, -1)
            map_entropy = _entropy(map_log_p)
            if targets is not None:
                if targets.shape != primal.shape[:2]:
                    raise ValueError(
                        f"targets must have shape (batch, tokens) = {tuple(primal.shape[:2])}, "
                        f"got {tuple(targets.shape)}"
                    )
                keep = targets != IGNORE_INDEX
                safe_targets = torch.where(keep, targets, 0).to(primal.device)
                map_picked = map_log_p.gather(-1, safe_targets[..., None])[..., 0] * keep
            del map_log_p
        log_p = torch.log_softmax(tangents.add_(primal), dim=-1)
        del tangents
        entropy_sum, prob_sum = accumulate_samples(log_p, entropy_sum, prob_sum)
        if safe_targets is not None and keep is not None:
            picked = log_p.gather(-1, safe_targets.expand(log_p.shape[0], -1, -1)[..., None])[..., 0]
            target_rows.append(picked * keep)
        del log_p
    assert prob_sum is not None and entropy_sum is not None and map_entropy is not None
    probs = prob_sum.div_(n_samples)
    entropy = _entropy(torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny)))
    aleatoric = entropy_sum / n_samples
    target_log_probs = log_predictive = None
    if safe_targets is not None and keep is not None:
        target_log_probs = torch.cat(target_rows)
        picked = probs.gather(-1, safe_targets[..., None])[..., 0]
        log_predictive = torch.log(picked.clamp(min=torch.finfo(probs.dtype).tiny)) * keep
    return VocabularyPredictive(
        probs=probs,
        entropy=entropy,
        aleatoric=aleatoric,
        mutual_information=(entropy - aleatoric).clamp(min=0),
        map_entropy=map_entropy,
        target_log_probs=target_log_probs,
        log_predictive=log_predictive,
        map_log_probs=map_picked,
    )


def check_sampling_options(
    n_samples: int, chunk_size: int | None, perturbations: Params | None, directions: Directions
) -> int:
    """The number of weight samples (that of ``perturbations`` when given); one-line errors for bad options.

    Examples:
        >>> check_sampling_options(16, None, None, "all")
        16
    """
    if perturbations is not None:
        return int(next(iter(perturbations.values())).shape[0])
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    check_directions(directions)
    return n_samples


def accumulate_samples(
    log_p: Float[Tensor, "samples *rows vocab"], entropy_sum: Tensor | None, prob_sum: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Add a chunk of sampled log-probabilities to the running sums of entropies and probabilities.

    The sums run over the leading (sample) dimension; ``None`` starts them. The predictive is
    ``prob_sum / n_samples``, the expected entropy ``entropy_sum / n_samples``.

    Examples:
        >>> entropy_sum, prob_sum = accumulate_samples(torch.log(torch.full((2, 1, 4), 0.25)), None, None)
        >>> prob_sum, round(float(entropy_sum), 4)
        (tensor([[0.5000, 0.5000, 0.5000, 0.5000]]), 2.7726)
    """
    p = log_p.exp()
    entropies = -(p * log_p).sum(-1).sum(0)
    entropy_sum = entropies if entropy_sum is None else entropy_sum + entropies
    prob_sum = p.sum(0) if prob_sum is None else prob_sum.add_(p.sum(0))
    return entropy_sum, prob_sum
