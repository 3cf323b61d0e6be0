"""bayesian-lora 0.0.6's function names and arguments, run on flaplace's functional core.

Code written against ``bayesian_lora`` (``calculate_kronecker_factors``, ``model_evidence``,
``jacobian_mean``, ``variance``, ``stable_cholesky``) can switch its import to
``flaplace.compat`` and get flaplace's maths: K-FAC without hooks, the Laplace evidence as
DESIGN.md section 3 defines it, per-example Jacobians and the block formula for ``J Sigma J^T``.
Every behavioural difference from bayesian-lora is listed, with the reason, in ``docs/compat.md``.

**The factor dictionary.** As in bayesian-lora, ``calculate_kronecker_factors`` returns
``{module name: (A, S)}``, the input-activation side first and the output-gradient side second.
Here *every* side is a square root ``R`` of its factor (``factor = R R^T``): ``(d, d)`` for a
dense side, ``(d, n_kfac)`` for a low-rank one. bayesian-lora returns dense sides as the factor
itself and expects them Cholesky-decomposed (``cholesky_decompose_small_factors``) before
``model_evidence`` and ``variance``; flaplace's factors are already in that form, so skip that step.
The normalisation is flaplace's: ``S`` sums over the examples and ``A`` averages, so that
``S (x) A`` approximates the curvature of the *summed* negative log-likelihood.

Example:
    >>> from flaplace import compat
    >>> factors = compat.calculate_kronecker_factors(model, fwd_call, loader, 8, 64, ["lora"])
    >>> s2 = torch.tensor(0.1, requires_grad=True)
    >>> log_z = compat.model_evidence(model, train_ll_sum, factors, 8, 8, s2)
    >>> jacobian, f_mu = compat.jacobian_mean(model, batch_inputs, target_ids)
    >>> f_var = compat.variance(batch_inputs, jacobian, factors, s2, 3, 8, 8, "cpu")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from flaplace.evidence import log_marginal_likelihood
from flaplace.kfac import fit as fit_kfac
from flaplace.params import ModelFunction, last_positions, logits_of, token_mask
from flaplace.posterior import make_posterior
from flaplace.predictive import JacobianMethod, _jacobians_and_logits, predictive_covariance
from flaplace.typing import Batch, Eigen, Factors, KronFactor, Params, Posterior

__all__ = [
    "KFACFactors",
    "calculate_kronecker_factors",
    "jacobian_mean",
    "model_evidence",
    "stable_cholesky",
    "variance",
]

#: ``{module name: (A_root, S_root)}`` with ``A = A_root A_root^T`` (input side) and
#: ``S = S_root S_root^T`` (output-gradient side); a root is ``(d, d)`` or ``(d, n_kfac)``.
KFACFactors: TypeAlias = dict[str, tuple[Tensor, Tensor]]

ForwardCall: TypeAlias = Callable[[nn.Module, Any], Tensor]


# --------------------------------------------------------------------------------------------
# K-FAC factors
# --------------------------------------------------------------------------------------------


def _target_linears(model: nn.Module, keywords: Sequence[str], exclude_bias: bool) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose name contains one of ``keywords`` (case-insensitive)."""
    if isinstance(keywords, str):
        raise TypeError(f"target_module_keywords is a list of keywords, got the string {keywords!r}")
    keywords = [k.lower() for k in keywords]
    if not keywords:
        raise ValueError("target_module_keywords needs at least one keyword ('' targets every nn.Linear)")
    chosen = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(k in name.lower() for k in keywords)
    }
    if not chosen:
        raise ValueError(
            f"no nn.Linear module of {type(model).__name__} has a name containing any of {keywords}"
        )
    with_bias = [name for name, module in chosen.items() if module.bias is not None]
    if with_bias and not exclude_bias:
        raise ValueError(
            f"{len(with_bias)} targeted module(s) have a bias, e.g. {with_bias[0]!r}; flaplace's K-FAC "
            "covers weight matrices only. Pass exclude_bias=True to leave biases out of the posterior."
        )
    return chosen


class _ForwardCall(nn.Module):
    """``forward(batch) = forward_call(model, batch)``, so that ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, forward_call: ForwardCall):
        super().__init__()
        self.model = model
        self.forward_call = forward_call

    def forward(self, batch: Any) -> Tensor:
        return self.forward_call(self.model, batch)


class _OutputShape(TorchFunctionMode):
    """Records the leading shape of the output of the first ``F.linear`` whose weight is watched."""

    def __init__(self, watched: set[int]):
        super().__init__()
        self.watched = watched
        self.shape: torch.Size | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and self.shape is None:
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            if id(weight) in self.watched:
                self.shape = out.shape[:-1]
        return out


def _no_targets(batch: Batch) -> Tensor:
    raise KeyError("compat K-FAC does not read targets from the batch")


def _has_token_tensors(batch: Any) -> bool:
    return isinstance(batch, Mapping) and any(
        isinstance(batch.get(key), Tensor) for key in ("attention_mask", "input_ids")
    )


def calculate_kronecker_factors(
    model: nn.Module,
    forward_call: ForwardCall,
    loader: Iterable[Any],
    n_kfac: int | None = None,
    lr_threshold: int = 512,
    target_module_keywords: Sequence[str] = ("",),
    exclude_bias: bool = False,
    use_tqdm: bool = False,
    *,
    fisher: str = "mc",
    generator: torch.Generator | None = None,
) -> KFACFactors:
    """K-FAC factors of the targeted ``nn.Linear`` weights, in bayesian-lora's dictionary layout.

    ``forward_call(model, batch)`` is run under :func:`torch.func.functional_call` (through a
    wrapper module, so the tensors flaplace differentiates are the ones the layers use) and
    flaplace's hook-free K-FAC (:func:`flaplace.kfac.fit`) accumulates the factors with
    ``sharing="last"``: the last real position of each sequence (read from the batch's
    ``attention_mask`` when the batch is a mapping that has one, otherwise the last position,
    as bayesian-lora does). When the batch carries no token tensors (e.g. a list of prompts that
    ``forward_call`` tokenises), one extra no-grad forward per batch finds the token layout.

    Args:
        model: any module (PEFT or not); its mode (train/eval) is left as it is.
        forward_call: ``forward_call(model, batch) -> logits (batch, classes)``.
        loader: an iterable of batches (a partial last batch is fine).
        n_kfac: rank of low-rank factors; ``None``: every factor dense.
        lr_threshold: a factor whose side is at least this is kept low rank (when ``n_kfac`` is set).
        target_module_keywords: case-insensitive keywords; every ``nn.Linear`` whose name
            contains one of them is targeted (``""`` targets all).
        exclude_bias: leave biases out; a targeted layer with a bias is an error otherwise.
        use_tqdm: show a progress bar.
        fisher: ``"mc"`` (one sampled label per example, as bayesian-lora) or ``"exact"`` (GGN).
        generator: random generator for the ``"mc"`` labels.

    Returns:
        ``{module name: (A_root, S_root)}`` with ``A = A_root A_root^T`` the input factor
        (averaged over examples) and ``S = S_root S_root^T`` the output-gradient factor (summed):
        roots are ``(d, d)``, or ``(d, n_kfac)`` for low-rank sides.

    Raises:
        ValueError: no module matches, a targeted layer has a bias, an empty loader, bad ranks,
            or a ``forward_call`` that does not return ``(batch, classes)`` logits.

    Example:
        >>> def fwd_call(model, prompts):
        ...     inputs = tokenizer(prompts, padding=True, return_tensors="pt")
        ...     return model(**inputs).logits[:, -1, target_ids]
        >>> factors = calculate_kronecker_factors(model, fwd_call, loader, 8, 64, ["lora"])
        >>> A_root, S_root = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"]
    """
    if n_kfac is not None and (not isinstance(n_kfac, int) or n_kfac < 1):
        raise ValueError(f"n_kfac must be a positive integer or None, got {n_kfac!r}")
    if not isinstance(lr_threshold, int) or lr_threshold < 1:
        raise ValueError(f"lr_threshold must be a positive integer, got {lr_threshold!r}")
    if fisher not in ("mc", "exact"):
        raise ValueError(
            f"fisher must be 'mc' or 'exact' (the batch's targets are not known), got {fisher!r}"
        )
    modules = _target_linears(model, target_module_keywords, exclude_bias)
    module_of = {f"{name}.weight": name for name in modules}
    params: Params = {f"{name}.weight": module.weight.detach() for name, module in modules.items()}
    wrapper = _ForwardCall(model, forward_call)
    warned: list[bool] = []

    # Each loader item travels through flaplace wrapped as a one-element tuple (a flaplace Batch),
    # whatever it is (a mapping, tensors, a list of prompts); it is unwrapped for forward_call.
    def model_fn(p: Params, wrapped: Batch) -> Tensor:
        batch = wrapped[0]  # type: ignore[index]
        logits = functional_call(wrapper, {f"model.{name}": t for name, t in p.items()}, (batch,))
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"forward_call must return logits of shape (batch, classes), got {shape}")
        if not warned and _looks_like_probabilities(logits.detach()):
            warned.append(True)
            warnings.warn(
                "forward_call returned rows that are non-negative and sum to 1: probabilities, not "
                "logits? K-FAC applies a softmax to what forward_call returns.",
                RuntimeWarning,
                stacklevel=4,
            )
        return logits

    def token_layout(wrapped: Batch) -> Tensor:
        batch = wrapped[0]  # type: ignore[index]
        if _has_token_tensors(batch):
            return token_mask(batch)
        mode = _OutputShape({id(t) for t in params.values()})
        with torch.no_grad(), mode:
            model_fn(params, wrapped)
        lead = mode.shape
        if lead is None or len(lead) not in (1, 2):
            raise ValueError(f"cannot find the (batch, tokens) layout of the targeted layers (got {lead})")
        shape = (lead[0], lead[1] if len(lead) == 2 else 1)
        device = next(iter(params.values())).device
        return torch.ones(shape, dtype=torch.bool, device=device)

    factors = cast(
        Factors,
        fit_kfac(
            model_fn,
            params,
            ((batch,) for batch in loader),
            progress=use_tqdm,
            sharing="last",
            fisher=fisher,
            n_kfac=n_kfac if n_kfac is not None else 1,
            lr_threshold=lr_threshold if n_kfac is not None else None,
            transposed=frozenset(),
            token_mask_fn=token_layout,
            targets_fn=_no_targets,
            generator=generator,
        ),
    )
    return {module_of[name]: (_root(f.A), _root(f.S)) for name, f in factors.items()}


def _looks_like_probabilities(logits: Tensor) -> bool:
    if logits.shape[-1] < 2 or not bool(torch.isfinite(logits).all()):
        return False
    sums = logits.sum(-1)
    return bool((logits >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-5))


def _root(eigen: Eigen) -> Float[Tensor, "d k"]:
    """``R`` with ``R R^T = Q diag(values) Q^T``."""
    return eigen.vectors * eigen.values.clamp_min(0).sqrt()


def _eigen_of_root(root: Tensor, dtype: torch.dtype) -> Eigen:
    """Eigen form of ``root @ root.T`` from a thin SVD of the root."""
    vectors, singular, _ = torch.linalg.svd(root.to(dtype), full_matrices=False)
    return Eigen(vectors, singular.square())


def _flaplace_factors(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    shapes: Mapping[str, torch.Size],
    dtype: torch.dtype,
) -> Factors:
    """bayesian-lora-layout roots as flaplace eigen-form factors.

    ``shapes`` maps each weight's parameter name to its ``(o, i)`` shape, in the order of the
    keys of ``factors``; the result is keyed by parameter name.
    """
    out: Factors = {}
    for name, (key, pair) in zip(shapes, factors.items(), strict=True):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"factors[{key!r}] must be a pair (A, S) of tensors")
        a_root, s_root = pair
        o, i = shapes[name]
        for side, root, want in (("A", a_root, i), ("S", s_root, o)):
            if root.ndim != 2 or root.shape[0] != want:
                raise ValueError(
                    f"factors[{key!r}]: the {side} factor has shape {tuple(root.shape)}, but the weight "
                    f"{name!r} of shape {(o, i)} needs {want} rows"
                )
            if not bool(torch.isfinite(root).all()):
                raise ValueError(f"factors[{key!r}]: the {side} factor is not finite")
        out[name] = KronFactor(
            S=_eigen_of_root(s_root, dtype),
            A=_eigen_of_root(a_root, dtype),
            transposed=torch.tensor(False, device=s_root.device),
        )
    return out


def _weight_name(key: str, names: Iterable[str]) -> str:
    """The parameter name of a factor key: ``key + ".weight"`` (module names) or ``key`` itself."""
    names = set(names)
    for candidate in (f"{key}.weight", key):
        if candidate in names:
            return candidate
    raise ValueError(f"factor key {key!r} matches no parameter (looked for {key + '.weight'!r} and {key!r})")


def _prior_precision(s2: Tensor | float) -> Tensor | float:
    if isinstance(s2, Tensor):
        if s2.numel() != 1:
            raise ValueError(f"s2 (the prior variance) must be a single number, got shape {tuple(s2.shape)}")
        if not bool(torch.isfinite(s2.detach()).all()) or not bool((s2.detach() > 0).all()):
            raise ValueError(f"s2 (the prior variance) must be positive and finite, got {float(s2.detach())}")
        return 1 / s2
    if not (isinstance(s2, int | float) and math.isfinite(s2) and s2 > 0):
        raise ValueError(f"s2 (the prior variance) must be positive and finite, got {s2!r}")
    return 1 / float(s2)


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
    ``P = S (x) A + P0`` per block (:func:`flaplace.evidence.log_marginal_likelihood`).
    ``theta`` is the current value of each factor's weight (``<module name>.weight``).

    Args:
        model: the model at the MAP; the weights are read from it.
        LL: the log-likelihood at the MAP SUMMED over the examples the factors were computed on
            (not a mean, not a held-out set).
        factors: from :func:`calculate_kronecker_factors` (roots, ``{module: (A, S)}``).
        n_lora: LoRA rank. Kept for bayesian-lora's signature; the shapes of the factors carry it.
        n_kfac: K-FAC rank. Kept for the signature, likewise unused.
        s2: prior variance, a positive number or one-element tensor (``requires_grad`` to tune it).

    Returns:
        ``log Z``, in ``s2``'s dtype and shape when ``s2`` is a tensor (computed in float64).

    Raises:
        ValueError: a factor key that names no weight, factor shapes that do not fit the weight,
            a non-positive ``s2`` or a non-finite ``LL``.

    Example:
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
    names = [_weight_name(key, named) for key in factors]
    for name in names:
        if named[name].ndim != 2:
            raise ValueError(f"{name!r} is not a weight matrix (shape {tuple(named[name].shape)})")
    params = {name: named[name].detach().to(torch.float64) for name in names}
    converted = _flaplace_factors(factors, {n: p.shape for n, p in params.items()}, torch.float64)
    precision = _prior_precision(s2)
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

    Runs :func:`flaplace.predictive.per_example_jacobians`: the cost grows linearly with the
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
            ``"vmap"`` or ``"loop"`` (see :func:`flaplace.predictive.per_example_jacobians`).
        chunk_size: examples per chunk, to bound memory.

    Returns:
        ``(jacobian, f_mu)``: ``{parameter name: (B, C, *shape)}`` and the logits ``(B, C)``.

    Raises:
        ValueError: no parameter requires grad, or the callback does not return ``(B, C)`` logits.

    Example:
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
    jacobian, f_mu = _jacobians_and_logits(
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
    (:func:`flaplace.predictive.predictive_covariance`); no matrix is inverted.

    Args:
        inputs: the batch inputs; only used to check the batch size (may be ``None``).
        jacobian: ``{parameter name: (B, C, o, i)}`` from :func:`jacobian_mean`; entries without
            a factor are ignored (those weights are fixed).
        factors: from :func:`calculate_kronecker_factors` (roots, ``{module: (A, S)}``).
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

    Example:
        >>> f_var = variance(batch_inputs, jacobian, factors, s2, 3, 8, 8, "cpu")
    """
    if not factors:
        raise ValueError("factors is empty")
    names = [_weight_name(key, jacobian) for key in factors]
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
    converted = _flaplace_factors(factors, {n: j.shape[2:] for n, j in selected.items()}, dtype)
    precision = _prior_precision(s2)
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


# --------------------------------------------------------------------------------------------
# Cholesky with jitter
# --------------------------------------------------------------------------------------------


def stable_cholesky(
    K: Tensor,  # noqa: N803 (bayesian-lora's argument name); (..., d, d), checked below
    mult_eps: float = 1e-8,
    abs_eps: float = 1e-8,
    max_tries: int = 1000,
) -> Float[Tensor, "*batch d d"]:
    """Lower Cholesky factor of ``K`` (or of a batch), adding diagonal jitter only where needed.

    First tries ``K`` itself. A matrix that fails is retried with bayesian-lora's jitter
    ``K * (1 + m I) + a I``, ``m = mult_eps * 1.1^t`` and ``a = abs_eps * 1.1^t`` at try ``t``;
    in a batch, each matrix keeps the first (smallest) jitter that works for it. Only the
    lower triangle of ``K`` is read.

    Args:
        K: symmetric positive (semi-)definite matrices ``(..., d, d)``.
        mult_eps: initial relative jitter on the diagonal.
        abs_eps: initial absolute jitter on the diagonal.
        max_tries: number of jittered attempts.

    Returns:
        ``L`` with ``L L^T = K`` (plus the jitter that was needed), lower triangular.

    Raises:
        ValueError: ``K`` is not a batch of square matrices or has non-finite entries, or some
            matrix is still not positive definite after ``max_tries`` attempts (the message
            gives how many and the largest jitter tried).

    Example:
        >>> L = stable_cholesky(f_var)  # f_var (B, C, C)
        >>> samples = f_mu[..., None] + L @ torch.randn(n, *f_mu.shape, 1)
    """
    if K.ndim < 2 or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be square matrices (..., d, d), got shape {tuple(K.shape)}")
    if not bool(torch.isfinite(K).all()):
        raise ValueError("K has non-finite entries; no jitter can make it positive definite")
    if max_tries < 1 or mult_eps < 0 or abs_eps < 0:
        raise ValueError(
            f"need max_tries >= 1 and non-negative jitter, got {max_tries}, {mult_eps}, {abs_eps}"
        )
    L, info = torch.linalg.cholesky_ex(K)
    failed = info != 0
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    growth = 1.0
    for _ in range(max_tries):
        if not bool(failed.any()):
            return L
        jittered = K * (1 + mult_eps * growth * eye) + abs_eps * growth * eye
        L_try, info = torch.linalg.cholesky_ex(jittered)
        fixed = failed & (info == 0)
        L = torch.where(fixed[..., None, None], L_try, L)
        failed = failed & (info != 0)
        growth *= 1.1
    if not bool(failed.any()):
        return L
    raise ValueError(
        f"stable_cholesky: {int(failed.sum())} of {failed.numel()} matrices of shape {tuple(K.shape[-2:])} "
        f"are not positive definite even with diagonal jitter up to {abs_eps * growth / 1.1:.3g} "
        f"(absolute) and {mult_eps * growth / 1.1:.3g} (relative) after {max_tries} tries; "
        "is K symmetric positive semi-definite?"
    )
