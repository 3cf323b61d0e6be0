"""The Laplace posterior in eigen form: prior precision and sampling.

Each adapted weight ``W`` (torch shape ``(o, i)``) is one block with precision

    P = S (x) A + lambda I,    S = Q_S diag(s) Q_S^T,  A = Q_A diag(a) Q_A^T,

in row-major ``vec(W)`` (see the Conventions page of the docs). The eigenvalues of ``P`` are
``s_i a_j + lambda`` on the span of the eigenbases and ``lambda`` outside it
(thin bases), so everything here works from ``(Q_S, s, Q_A, a, lambda)`` and never
forms an ``o*i x o*i`` matrix (except in the ``*_dense`` helpers, meant for tests
on small blocks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from flaplace.posterior_io import check_blocks, check_prior_mean, validate_posterior
from flaplace.posterior_io import load_posterior as load_posterior  # re-exported for existing callers
from flaplace.posterior_io import save_posterior as save_posterior
from flaplace.typing import Eigen, Factors, KronFactor, Params, Posterior

#: A prior precision: one value for every block, or a mapping whose keys are exact
#: parameter names or case-insensitive keywords of groups of blocks (e.g. ``"lora_A"``).
PriorPrecision = float | Tensor | Mapping[str, float | Tensor]


# --------------------------------------------------------------------------- blocks


def block_shape(factor: KronFactor) -> tuple[int, int]:
    """The ``(o, i)`` shape of a block (the parameter's storage shape is ``(i, o)`` when transposed)."""
    return factor.S.vectors.shape[0], factor.A.vectors.shape[0]


def stored_shape(factor: KronFactor) -> tuple[int, int]:
    """The shape the parameter tensor of this block has in the model."""
    o, i = block_shape(factor)
    return (i, o) if bool(factor.transposed) else (o, i)


def assign_blocks(names: Sequence[str], keys: Iterable[str]) -> dict[str, str]:
    """Map every block name to the one key that covers it.

    A key covers a block when it equals the block's name, or (when it is not
    itself a block name) when it occurs in the name, case-insensitively.

    Raises:
        ValueError: a key covers no block, a block is covered by no key, or by
            more than one.

    Examples:
        >>> assign_blocks(["l0.lora_A.weight", "l0.lora_B.weight"], ["lora_a", "lora_b"])
        {'l0.lora_A.weight': 'lora_a', 'l0.lora_B.weight': 'lora_b'}
    """
    keys = list(keys)
    name_set = set(names)
    owner: dict[str, str] = {}
    for key in keys:
        covered = [key] if key in name_set else [n for n in names if key.lower() in n.lower()]
        if not covered:
            example = ", ".join(list(names)[:3])
            raise ValueError(
                f"prior precision key {key!r} is neither a parameter name nor a keyword of one "
                f"(names look like: {example}, ...)"
            )
        for name in covered:
            if name in owner:
                raise ValueError(
                    f"block {name!r} is covered by two prior precision keys, {owner[name]!r} and "
                    f"{key!r}; each block must be covered exactly once"
                )
            owner[name] = key
    missing = [n for n in names if n not in owner]
    if missing:
        raise ValueError(
            f"{len(missing)} block(s) have no prior precision, e.g. {missing[0]!r}; "
            f"the keys given were {keys}"
        )
    return {n: owner[n] for n in names}


def _precision_tensor(value: float | Tensor, where: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """One prior precision as a 0-d tensor, checked positive and finite; keeps the autograd graph."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"prior precision {where} must be a single number, got shape {tuple(value.shape)}"
            )
        tensor = value.to(dtype=dtype, device=device).reshape(())
    elif isinstance(value, int | float) and not isinstance(value, bool):
        tensor = torch.tensor(float(value), dtype=dtype, device=device)
    else:
        raise TypeError(f"prior precision {where} must be a float or a tensor, got {type(value).__name__}")
    if not bool(torch.isfinite(tensor.detach())) or not bool(tensor.detach() > 0):
        raise ValueError(f"prior precision {where} must be positive and finite, got {float(tensor.detach())}")
    return tensor


def prior_precision_per_block(
    names: Sequence[str],
    prior_precision: PriorPrecision,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, Tensor]:
    """Resolve a prior precision to one 0-d tensor per block.

    Tensors are converted with ``.to`` (not detached), so a prior precision that
    requires grad stays differentiable.

    Args:
        names: the block names.
        prior_precision: a float or one-element tensor (every block), or a mapping
            from exact parameter names or case-insensitive group keywords to values
            (see `assign_blocks`).
        dtype: the dtype of the returned tensors.
        device: the device of the returned tensors.

    Examples:
        >>> names = ["l0.lora_A.weight", "l0.lora_B.weight"]
        >>> prior_precision_per_block(names, {"lora_A": 1.0, "lora_B": 10.0}, dtype=torch.float64, device="cpu")
        {'l0.lora_A.weight': tensor(1., dtype=torch.float64), 'l0.lora_B.weight': tensor(10., dtype=torch.float64)}
    """
    device = torch.device(device)
    if isinstance(prior_precision, Mapping):
        if not prior_precision:
            raise ValueError("the prior precision mapping is empty")
        owner = assign_blocks(names, prior_precision.keys())
        resolved = {
            key: _precision_tensor(value, f"for {key!r}", dtype, device)
            for key, value in prior_precision.items()
        }
        return {name: resolved[owner[name]] for name in names}
    shared = _precision_tensor(prior_precision, "(one value for every block)", dtype, device)
    return dict.fromkeys(names, shared)


# --------------------------------------------------------------------------- construction


def make_posterior(
    factors: Factors,
    params: Params,
    prior_precision: PriorPrecision,
    prior_mean: Params | None = None,
) -> Posterior:
    """The Laplace posterior ``N(theta*, P^{-1})`` with ``P = S (x) A + lambda I`` per block.

    Args:
        factors: eigen-form K-FAC factors keyed by parameter name; thin bases allowed.
        params: the MAP adapter weights ``theta*`` (e.g. ``select_params(model, "lora")``),
            the same names as ``factors``; each is ``(o, i)``, or ``(i, o)`` for a
            transposed block.
        prior_precision: ``lambda``: a positive float or tensor for every block, or a
            mapping from exact parameter names or case-insensitive group keywords
            to values, e.g. ``{"lora_A": 1.0, "lora_B": 10.0}``; every block must
            be covered by exactly one key.
        prior_mean: the centre ``m`` of the prior ``N(m, 1/lambda I)``, one tensor per block
            with the names and shapes of ``params``; ``None`` (default): a prior centred at
            zero. Pass the adapter weights at initialisation (e.g. LoRA's random ``lora_A``
            and zero ``lora_B``) when the MAP was trained with an L2 term towards them; the
            evidence then charges only ``||theta* - m||^2``, the distance the data moved them.

    Returns:
        A [`Posterior`][flaplace.typing.Posterior], with the prior precision stored as a
        0-d tensor per block in the dtype and device of the factors, and the prior mean
        (detached copies) or ``None``.

    Raises:
        ValueError: names or shapes that do not match, non-finite values, a
            non-positive prior precision, an unknown or ambiguous key.

    Examples:
        >>> params = select_params(model, "lora")  # doctest: +SKIP
        >>> posterior = make_posterior(factors, params, {"lora_A": 1.0, "lora_B": 10.0})  # doctest: +SKIP
        >>> init = {n: p.detach().clone() for n, p in select_params(model, "lora").items()}  # doctest: +SKIP
        >>> centred = make_posterior(factors, trained, 1.0, prior_mean=init)  # doctest: +SKIP
    """
    check_blocks(factors, params)
    if prior_mean is not None:
        check_prior_mean(prior_mean, params)
    names = list(params)
    first = factors[names[0]].S.values
    precision = prior_precision_per_block(names, prior_precision, dtype=first.dtype, device=first.device)
    posterior = Posterior(
        mean=dict(params),
        factors={n: factors[n] for n in names},
        prior_precision=precision,
        prior_mean=None if prior_mean is None else {n: prior_mean[n].detach().clone() for n in names},
    )
    validate_posterior(posterior, values=False)  # the blocks were checked in full just above
    return posterior


def with_prior_precision(posterior: Posterior, prior_precision: PriorPrecision) -> Posterior:
    """The same posterior with a new prior precision (tensors are kept, not detached).

    The evidence of the result is differentiable in ``prior_precision`` when it
    is a tensor (or a mapping of tensors) that requires grad.

    Examples:
        >>> log_lam = torch.zeros((), dtype=torch.float64, requires_grad=True)
        >>> log_z = log_marginal_likelihood(with_prior_precision(posterior, log_lam.exp()), ll)
        >>> log_z.backward()  # log_lam.grad = d log Z / d log lambda
    """
    names = list(posterior.mean)
    reference = next(iter(posterior.prior_precision.values()))
    precision = prior_precision_per_block(
        names, prior_precision, dtype=reference.dtype, device=reference.device
    )
    result = posterior._replace(prior_precision=precision)
    validate_posterior(result, values=False)
    return result


# --------------------------------------------------------------------------- sampling


def sqrt_covariance_times(
    factor: KronFactor, prior_precision: Tensor, z: Float[Tensor, "n o i"]
) -> Float[Tensor, "n o i"]:
    """``Sigma^{1/2} Z`` for a batch of ``(o, i)`` matrices ``Z``, in the eigen form of the block.

    On the span of the eigenbases the precision is ``s_i a_j + lambda``, outside it ``lambda``, so
    ``Sigma^{1/2} Z = Z / sqrt(lambda) + Q_S [M * (Q_S^T Z Q_A)] Q_A^T`` with
    ``M_ij = (s_i a_j + lambda)^{-1/2} - lambda^{-1/2}`` (negative eigenvalues from round-off
    clamped at 0). With ``Z`` standard normal it is a draw of ``N(0, Sigma)`` for the block.

    Examples:
        >>> import torch
        >>> unit = Eigen(torch.eye(2), torch.zeros(2))  # no curvature: Sigma = I / lambda
        >>> factor = KronFactor(unit, unit, torch.tensor(False))
        >>> sqrt_covariance_times(factor, torch.tensor(4.0), torch.ones(1, 2, 2))
        tensor([[[0.5000, 0.5000],
                 [0.5000, 0.5000]]])
    """
    q_s, s = factor.S
    q_a, a = factor.A
    eig = s.clamp(min=0)[:, None] * a.clamp(min=0)[None, :]
    inv_sqrt_lam = prior_precision.rsqrt()
    scale = (eig + prior_precision).rsqrt() - inv_sqrt_lam
    coefficients = q_s.mT @ z @ q_a
    return z * inv_sqrt_lam + q_s @ (scale * coefficients) @ q_a.mT


def sample(posterior: Posterior, n_samples: int, generator: torch.Generator | None = None) -> Params:
    """Draw ``theta = theta* + Sigma^{1/2} z``, ``z ~ N(0, I)``, from the posterior.

    Per block with ``Z`` of shape ``(o, i)``:
    ``Sigma^{1/2} Z = Z / sqrt(lambda) + Q_S [M * (Q_S^T Z Q_A)] Q_A^T`` with
    ``M_ij = (s_i a_j + lambda)^{-1/2} - lambda^{-1/2}``; it holds for thin bases
    because the complement of their span has precision ``lambda``. Negative
    eigenvalues from round-off are clamped at 0.

    Args:
        posterior: from `make_posterior`.
        n_samples: number of samples (positive).
        generator: a ``torch.Generator`` on the factors' device, for reproducibility.

    Returns:
        A dict with the posterior's names; each leaf has shape ``(n_samples, *param.shape)``
        and the dtype of the MAP parameter.

    Examples:
        >>> draws = sample(posterior, 8, generator=torch.Generator().manual_seed(0))
        >>> draws[name].shape  # (8, o, i) for each block
        torch.Size([8, 3, 4])
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    draws: Params = {}
    for name, mean in posterior.mean.items():
        factor = posterior.factors[name]
        values = factor.S.values
        o, i = block_shape(factor)
        z = torch.randn((n_samples, o, i), generator=generator, dtype=values.dtype, device=values.device)
        delta = sqrt_covariance_times(factor, posterior.prior_precision[name], z)
        if bool(factor.transposed):
            delta = delta.mT
        draws[name] = (mean.to(values.dtype) + delta).to(mean.dtype)
    return draws


# --------------------------------------------------------------------------- dense (small blocks only)


def _dense(eigen: Eigen) -> Tensor:
    return eigen.dense()


def precision_dense(posterior: Posterior, name: str) -> Float[Tensor, "d d"]:
    """The dense precision ``S (x) A + lambda I`` of one block (``d = o*i``, row-major ``vec`` of ``(o, i)``).

    For tests and debugging on small blocks only: it materialises a ``d x d`` matrix.
    For a transposed block the ordering is still that of the ``(o, i)`` matrix.

    Examples:
        >>> P = precision_dense(posterior, "fc.weight")
    """
    factor = posterior.factors[name]
    kron = torch.kron(_dense(factor.S), _dense(factor.A))
    eye = torch.eye(kron.shape[0], dtype=kron.dtype, device=kron.device)
    return kron + posterior.prior_precision[name] * eye


def covariance_dense(posterior: Posterior, name: str) -> Float[Tensor, "d d"]:
    """The dense covariance ``P^{-1}`` of one block; small blocks only (see `precision_dense`).

    Examples:
        >>> Sigma = covariance_dense(posterior, "fc.weight")
    """
    return torch.linalg.inv(precision_dense(posterior, name))


def num_parameters(posterior: Posterior) -> int:
    """The number of scalar weights the posterior covers.

    Examples:
        >>> num_parameters(posterior)  # one 3 x 4 weight
        12
    """
    return sum(math.prod(mean.shape) for mean in posterior.mean.values())
