"""bayesian-lora 0.0.6's function names and arguments, run on flaplace's functional core.

Code written against ``bayesian_lora`` (``calculate_kronecker_factors``, ``model_evidence``,
``jacobian_mean``, ``variance``, ``stable_cholesky``) can switch its import to
``flaplace.compat`` and get flaplace's maths: K-FAC without hooks, the Laplace evidence as
the Conventions page of the docs defines it, per-example Jacobians and the block formula for ``J Sigma J^T``.
Every behavioural difference from bayesian-lora is listed, with the reason, in ``docs/compat.md``.

**The factor dictionary.** As in bayesian-lora, ``calculate_kronecker_factors`` returns
``{module name: (A, S)}``, the input-activation side first and the output-gradient side second.
Here *every* side is a square root ``R`` of its factor (``factor = R R^T``): ``(d, d)`` for a
dense side, ``(d, n_kfac)`` for a low-rank one. bayesian-lora returns dense sides as the factor
itself and expects them Cholesky-decomposed (``cholesky_decompose_small_factors``) before
``model_evidence`` and ``variance``; flaplace's factors are already in that form, so skip that step.
The normalisation is flaplace's: ``S`` sums over the examples and ``A`` averages, so that
``S (x) A`` approximates the curvature of the *summed* negative log-likelihood.

Examples:
    >>> from flaplace import compat
    >>> factors = compat.calculate_kronecker_factors(model, fwd_call, loader, 8, 64, ["lora"])
    >>> s2 = torch.tensor(0.1, requires_grad=True)
    >>> log_z = compat.model_evidence(model, train_ll_sum, factors, 8, 8, s2)
    >>> jacobian, f_mu = compat.jacobian_mean(model, batch_inputs, target_ids)
    >>> f_var = compat.variance(batch_inputs, jacobian, factors, s2, 3, 8, 8, "cpu")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from flaplace.compat.cholesky import stable_cholesky
from flaplace.compat.factors import ForwardCall, KFACFactors, calculate_kronecker_factors
from flaplace.compat.roots import eigen_factors, prior_precision_of, weight_name
from flaplace.evidence import log_marginal_likelihood
from flaplace.jacobians import JacobianMethod, jacobians_and_logits
from flaplace.params import ModelFunction, last_positions, logits_of
from flaplace.posterior import make_posterior
from flaplace.predictive import predictive_covariance
from flaplace.typing import Batch, Posterior

__all__ = [
    "ForwardCall",
    "KFACFactors",
    "calculate_kronecker_factors",
    "jacobian_mean",
    "model_evidence",
    "stable_cholesky",
    "variance",
]


# --------------------------------------------------------------------------------------------
# Evidence
# --------------------------------------------------------------------------------------------


def model_evidence(
    model: nn.Module,
    LL: Tensor | float,  # noqa: N803 (bayesian-lora's argument name)
    factors: Mapping[str, tuple[Tensor, Tensor]],
    n_lora: int,
    n_kfac: int | None,
    s2: Tensor | float,
) -> Tensor:
    """The Laplace log marginal likelihood with prior ``N(0, s2 I)``, differentiable in ``s2``.

    ``log Z = LL - |theta|^2 / (2 s2) - 1/2 sum_blocks sum_ij log(1 + s2 s_i a_j)``, which is
    ``LL - 1/2 theta^T P0 theta - 1/2 (logdet P - logdet P0)`` with ``P0 = I / s2`` and
    ``P = S (x) A + P0`` per block ([`flaplace.evidence.log_marginal_likelihood`][flaplace.evidence.log_marginal_likelihood]).
    ``theta`` is the current value of each factor's weight (``<module name>.weight``).

    Args:
        model: the model at the MAP; the weights are read from it.
        LL: the log-likelihood at the MAP SUMMED over the examples the factors were computed on
            (not a mean, not a held-out set).
        factors: from `calculate_kronecker_factors` (roots, ``{module: (A, S)}``).
        n_lora: LoRA rank. Kept for bayesian-lora's signature; the shapes of the factors carry it.
        n_kfac: K-FAC rank. Kept for the signature, likewise unused.
        s2: prior variance, a positive number or one-element tensor (``requires_grad`` to tune it).

    Returns:
        ``log Z``, in ``s2``'s dtype and shape when ``s2`` is a tensor (computed in float64).

    Raises:
        ValueError: a factor key that names no weight, factor shapes that do not fit the weight,
            a non-positive ``s2`` or a non-finite ``LL``.

    Examples:
        >>> s2 = torch.tensor(0.1, requires_grad=True)
        >>> opt = torch.optim.Adam([s2], lr=1e-2)
        >>> for _ in range(100):
        ...     opt.zero_grad()
        ...     (-model_evidence(model, LL, factors, 8, 8, s2)).backward()
        ...     opt.step()
    """
    if not factors:
        raise ValueError("factors is empty")
    named = dict(model.named_parameters())
    names = [weight_name(key, named) for key in factors]
    for name in names:
        if named[name].ndim != 2:
            raise ValueError(f"{name!r} is not a weight matrix (shape {tuple(named[name].shape)})")
    params = {name: named[name].detach().to(torch.float64) for name in names}
    converted = eigen_factors(factors, {n: p.shape for n, p in params.items()}, torch.float64)
    precision = prior_precision_of(s2)
    posterior = make_posterior(converted, params, precision)
    log_z = log_marginal_likelihood(posterior, LL)
    if isinstance(s2, Tensor):
        return log_z.to(s2.dtype).reshape(s2.shape)
    return log_z


# --------------------------------------------------------------------------------------------
# Predictive
# --------------------------------------------------------------------------------------------


class _DefaultLogits:
    """bayesian-lora's intended default output callback, made to work.

    Causal LMs (``is_s2s=False``, 3-D logits): the logits at the last real position of each
    example (from ``attention_mask``; the last position without one). Sequence-to-sequence
    (``is_s2s=True``): the last decoder position. 2-D logits (classification heads) are used as
    they are. ``target_ids`` then selects columns.
    """

    def __init__(self, target_ids: Tensor | Sequence[int] | None, is_s2s: bool):
        self.target_ids = (
            None if target_ids is None else torch.as_tensor(target_ids, dtype=torch.long).reshape(-1)
        )
        self.is_s2s = is_s2s

    def __call__(self, output: object, batch: Batch) -> Tensor:
        logits = logits_of(output)
        if logits.ndim == 3:
            if self.is_s2s:
                logits = logits[:, -1]
            else:
                last = last_positions(batch, logits.shape[1], logits.device)
                logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
        elif logits.ndim != 2:
            raise ValueError(f"cannot read logits of shape {tuple(logits.shape)}; pass an output_callback")
        if self.target_ids is not None:
            logits = logits[:, self.target_ids.to(logits.device)]
        return logits


def jacobian_mean(
    model: nn.Module,
    batch_inputs: Mapping[str, Any],
    target_ids: Tensor | Sequence[int] | None = None,
    is_s2s: bool = False,
    output_callback: Callable[[Any], Tensor] | None = None,
    *,
    method: JacobianMethod = "capture",
    chunk_size: int | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example Jacobians of the logits w.r.t. every parameter that requires grad, and the logits.

    Runs [`flaplace.jacobians.per_example_jacobians`][flaplace.jacobians.per_example_jacobians]: the cost grows linearly with the
    batch (bayesian-lora differentiates the whole batch at once, quadratic in the batch).

    Args:
        model: the model at the MAP; the parameters with ``requires_grad`` are differentiated
            (for a PEFT model, the LoRA weights).
        batch_inputs: the inputs as for ``model(**batch_inputs)`` (e.g. a tokenizer's output);
            ``labels`` is not passed to the model.
        target_ids: columns of the logits to keep (e.g. the answer tokens); ``None`` keeps all.
        is_s2s: sequence-to-sequence model: read the last decoder position instead of the last
            real input position (see the default callback below).
        output_callback: ``output_callback(model_output) -> logits (batch, classes)``; it is
            called on the whole batch or on one example at a time depending on ``method``.
            Default: for 3-D logits the last real position of each example (from
            ``attention_mask``; padding-aware) or, with ``is_s2s``, the last decoder position;
            2-D logits as they are; then ``target_ids``.
        method: ``"capture"`` (default: one forward of the batch and ``C`` pull-backs; every
            differentiated parameter must be a weight used through ``F.linear``, as LoRA's are),
            ``"vmap"`` or ``"loop"`` (see [`flaplace.jacobians.per_example_jacobians`][flaplace.jacobians.per_example_jacobians]).
        chunk_size: examples per chunk, to bound memory.

    Returns:
        ``(jacobian, f_mu)``: ``{parameter name: (B, C, *shape)}`` and the logits ``(B, C)``.

    Raises:
        ValueError: no parameter requires grad, or the callback does not return ``(B, C)`` logits.

    Examples:
        >>> with torch.no_grad():
        ...     jacobian, f_mu = jacobian_mean(model, tokenizer(prompts, return_tensors="pt", padding=True), [354, 355])
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"no parameter of {type(model).__name__} requires grad: mark the adapter weights trainable "
            "(a PEFT model loaded for inference needs is_trainable=True)"
        )
    if output_callback is None:
        output_fn: Callable[[object, Batch], Tensor] = _DefaultLogits(target_ids, is_s2s)
    else:

        def output_fn(output: object, batch: Batch) -> Tensor:
            return output_callback(output)

    model_fn = ModelFunction(model, params, output_fn)
    jacobian, f_mu = jacobians_and_logits(
        model_fn, params, batch_inputs, chunk_size=chunk_size, method=method
    )
    return jacobian, f_mu


def variance(
    inputs: Mapping[str, Any] | None,
    jacobian: Mapping[str, Tensor],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    s2: Tensor | float,
    n_logits: int,
    n_lora: int,
    n_kfac: int | None,
    device: str | torch.device,
) -> Float[Tensor, "batch n_logits n_logits"]:
    """The linearised predictive covariance ``J Sigma J^T`` of the logits, ``(B, C, C)``.

    ``Sigma`` is the Laplace posterior covariance with precision ``S (x) A + I / s2`` per block,
    applied by flaplace's block formula from the eigen-decomposition of the factors
    ([`flaplace.predictive.predictive_covariance`][flaplace.predictive.predictive_covariance]); no matrix is inverted.

    Args:
        inputs: the batch inputs; only used to check the batch size (may be ``None``).
        jacobian: ``{parameter name: (B, C, o, i)}`` from `jacobian_mean`; entries without
            a factor are ignored (those weights are fixed).
        factors: from `calculate_kronecker_factors` (roots, ``{module: (A, S)}``).
        s2: prior variance (number or one-element tensor; the result is differentiable in it).
        n_logits: number of logits ``C`` (checked against the Jacobians).
        n_lora: kept for bayesian-lora's signature; unused.
        n_kfac: kept for bayesian-lora's signature; unused.
        device: where the result is returned.

    Returns:
        ``f_var``, ``(B, C, C)``, in the promoted dtype of the Jacobians and factors.

    Raises:
        ValueError: a factor without a Jacobian, shapes that do not fit, a wrong ``n_logits``
            or batch size, a non-positive ``s2``.

    Examples:
        >>> f_var = variance(batch_inputs, jacobian, factors, s2, 3, 8, 8, "cpu")
    """
    if not factors:
        raise ValueError("factors is empty")
    names = [weight_name(key, jacobian) for key in factors]
    selected = {name: jacobian[name] for name in names}
    for name, jac in selected.items():
        if jac.ndim != 4:
            raise ValueError(f"jacobian[{name!r}] must be (batch, logits, o, i), got {tuple(jac.shape)}")
        if jac.shape[1] != n_logits:
            raise ValueError(f"jacobian[{name!r}] has {jac.shape[1]} logits, but n_logits is {n_logits}")
    batch_size = next(iter(selected.values())).shape[0]
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else getattr(inputs, "input_ids", None)
    if isinstance(ids, Tensor) and ids.shape[0] != batch_size:
        raise ValueError(f"the inputs hold {ids.shape[0]} examples but the Jacobians {batch_size}")
    roots = [root for pair in factors.values() for root in pair]
    dtype = torch.promote_types(next(iter(selected.values())).dtype, roots[0].dtype)
    selected = {name: jac.to(dtype) for name, jac in selected.items()}
    converted = eigen_factors(factors, {n: j.shape[2:] for n, j in selected.items()}, dtype)
    precision = prior_precision_of(s2)
    if isinstance(precision, Tensor):
        precision = precision.to(dtype).reshape(())
    else:
        precision = torch.tensor(precision, dtype=dtype)
    first = next(iter(selected.values()))
    posterior = Posterior(
        mean={n: torch.zeros(j.shape[2:], dtype=dtype, device=first.device) for n, j in selected.items()},
        factors=converted,
        prior_precision=dict.fromkeys(converted, precision.to(first.device)),
    )
    return predictive_covariance(posterior, selected).to(device)
