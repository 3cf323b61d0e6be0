"""The Laplace posterior in eigen form: prior precision, sampling, save and load.

Each adapted weight ``W`` (torch shape ``(o, i)``) is one block with precision

    P = S (x) A + lambda I,    S = Q_S diag(s) Q_S^T,  A = Q_A diag(a) Q_A^T,

in row-major ``vec(W)`` (see the Conventions page of the docs). The eigenvalues of ``P`` are
``s_i a_j + lambda`` on the span of the eigenbases and ``lambda`` outside it
(thin bases), so everything here works from ``(Q_S, s, Q_A, a, lambda)`` and never
forms an ``o*i x o*i`` matrix (except in the ``*_dense`` helpers, meant for tests
on small blocks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from flaplace.typing import Eigen, Factors, KronFactor, Params, Posterior

#: A prior precision: one value for every block, or a mapping whose keys are exact
#: parameter names or case-insensitive keywords of groups of blocks (e.g. ``"lora_A"``).
PriorPrecision = float | Tensor | Mapping[str, float | Tensor]

#: Version of the on-disk layout written by `save_posterior`.
FORMAT_VERSION = "1"
FORMAT_NAME = "flaplace.posterior"
#: Separates a block's name from its field in a safetensors key. Torch parameter
#: names are dotted identifiers, so ``"|"`` never appears in them (checked on save).
KEY_SEPARATOR = "|"
FIELDS = ("mean", "S.vectors", "S.values", "A.vectors", "A.values", "prior_precision")


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
        >>> prior_precision_per_block(names, {"lora_A": 1.0, "lora_B": 10.0}, dtype=torch.float64, device="cpu")
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
    shared = _precision_tensor(prior_precision, "", dtype, device)
    return dict.fromkeys(names, shared)


# --------------------------------------------------------------------------- construction


def _check_eigen(eigen: Eigen, side: int, where: str) -> None:
    vectors, values = eigen
    if vectors.ndim != 2 or values.ndim != 1 or vectors.shape[1] != values.shape[0]:
        raise ValueError(
            f"{where}: eigen form needs vectors (d, k) and values (k,), "
            f"got {tuple(vectors.shape)} and {tuple(values.shape)}"
        )
    if vectors.shape[0] != side:
        raise ValueError(f"{where}: expected side {side}, got eigenvectors of shape {tuple(vectors.shape)}")
    if vectors.shape[1] > side:
        raise ValueError(f"{where}: {vectors.shape[1]} eigenvectors for a side of {side}")
    if not (bool(torch.isfinite(vectors).all()) and bool(torch.isfinite(values).all())):
        raise ValueError(f"{where}: eigenvectors or eigenvalues are not finite")


def check_blocks(factors: Factors, params: Params) -> None:
    """Check that ``factors`` and ``params`` have the same names and matching shapes.

    Raises:
        ValueError: naming the first mismatch.

    Examples:
        >>> check_blocks(factors, select_params(model, "lora"))
    """
    if not params:
        raise ValueError("params is empty: there is no block to build a posterior over")
    missing = [n for n in params if n not in factors]
    if missing:
        raise ValueError(f"parameter {missing[0]!r} has no K-FAC factors ({len(missing)} missing)")
    extra = [n for n in factors if n not in params]
    if extra:
        raise ValueError(f"factors for {extra[0]!r} have no matching parameter ({len(extra)} unknown)")
    for name, param in params.items():
        factor = factors[name]
        if param.ndim != 2:
            raise ValueError(
                f"{name}: a block must be a matrix, got a parameter of shape {tuple(param.shape)}"
            )
        if factor.transposed.numel() != 1:
            raise ValueError(f"{name}: transposed must be a 0-d bool tensor")
        want = (param.shape[1], param.shape[0]) if bool(factor.transposed) else tuple(param.shape)
        _check_eigen(factor.S, want[0], f"{name} (S factor)")
        _check_eigen(factor.A, want[1], f"{name} (A factor)")
        if not bool(torch.isfinite(param).all()):
            raise ValueError(f"{name}: the MAP parameters are not finite")


def validate_posterior(posterior: Posterior, *, values: bool = True) -> None:
    """Check that ``posterior`` is a usable Laplace posterior; raise naming the first problem.

    The one validation every entry point runs (`make_posterior`, `load_posterior`,
    `with_prior_precision`, the evidence): the same names in ``mean``, ``factors`` and
    ``prior_precision``; each block a matrix whose factors fit its shape (`check_blocks`);
    each prior precision a single positive, finite number.

    Args:
        posterior: the posterior to check.
        values: also check that the means, eigenvectors and eigenvalues are finite (reads
            every tensor once); ``False`` checks the names, shapes and prior precisions only.

    Raises:
        ValueError: naming the block and what is wrong with it.

    Examples:
        >>> validate_posterior(posterior)  # silent when the posterior is fine
    """
    if not isinstance(posterior, Posterior):
        raise TypeError(f"expected a Posterior (from make_posterior), got {type(posterior).__name__}")
    names = list(posterior.mean)
    if set(posterior.prior_precision) != set(names):
        odd = sorted(set(posterior.prior_precision) ^ set(names))
        raise ValueError(
            f"posterior.prior_precision must have one value per block; {odd[0]!r} is in only one of "
            "mean and prior_precision"
        )
    if values:
        check_blocks(posterior.factors, posterior.mean)
    else:
        missing = sorted(set(names) ^ set(posterior.factors))
        if missing:
            raise ValueError(f"block {missing[0]!r} is in only one of posterior.mean and posterior.factors")
    if torch.compiler.is_compiling():
        return
    for name in names:
        value = posterior.prior_precision[name]
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"prior precision of {name!r} must be a single-number tensor, got {value!r}")
        number = float(value.detach())
        if not (math.isfinite(number) and number > 0):
            raise ValueError(
                f"prior precision of {name!r} must be positive and finite, got {number}; "
                "pass a positive prior_precision (e.g. 1.0) or tune it with tune_prior_evidence"
            )


def make_posterior(factors: Factors, params: Params, prior_precision: PriorPrecision) -> Posterior:
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

    Returns:
        A [`Posterior`][flaplace.typing.Posterior], with the prior precision stored as a
        0-d tensor per block in the dtype and device of the factors.

    Raises:
        ValueError: names or shapes that do not match, non-finite values, a
            non-positive prior precision, an unknown or ambiguous key.

    Examples:
        >>> params = select_params(model, "lora")
        >>> posterior = make_posterior(factors, params, {"lora_A": 1.0, "lora_B": 10.0})
    """
    check_blocks(factors, params)
    names = list(params)
    first = factors[names[0]].S.values
    precision = prior_precision_per_block(names, prior_precision, dtype=first.dtype, device=first.device)
    posterior = Posterior(
        mean=dict(params),
        factors={n: factors[n] for n in names},
        prior_precision=precision,
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
        >>> draws["model.layers.0.q_proj.lora_A.default.weight"].shape  # (8, r, hidden)
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


# --------------------------------------------------------------------------- save / load


def save_posterior(path: str | PathLike[str], posterior: Posterior) -> None:
    """Write a posterior to a safetensors file.

    Keys are ``"<parameter name>|<field>"``; the metadata records the format
    version, the block names in order and their transposed flags. Prior
    precisions are saved detached.

    Examples:
        >>> save_posterior("posterior.safetensors", posterior)
    """
    tensors: dict[str, Tensor] = {}
    for name, mean in posterior.mean.items():
        if KEY_SEPARATOR in name:
            raise ValueError(f"parameter name {name!r} contains {KEY_SEPARATOR!r} and cannot be saved")
        factor = posterior.factors[name]
        fields = (
            mean,
            factor.S.vectors,
            factor.S.values,
            factor.A.vectors,
            factor.A.values,
            posterior.prior_precision[name],
        )
        for field, tensor in zip(FIELDS, fields, strict=True):
            tensors[f"{name}{KEY_SEPARATOR}{field}"] = tensor.detach().contiguous().clone()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "names": json.dumps(list(posterior.mean)),
        "transposed": json.dumps([bool(posterior.factors[n].transposed) for n in posterior.mean]),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_posterior(
    path: str | PathLike[str],
    params: Params | None = None,
    device: torch.device | str | None = None,
) -> Posterior:
    """Read a posterior written by `save_posterior`, checked against the model's adapter weights.

    Args:
        path: the safetensors file.
        params: the model's adapter weights (e.g. ``select_params(model, "lora")``).
            When given, the saved names must be exactly its names, and each saved
            mean must have its shape and dtype; the loaded mean is the saved
            one (the MAP at save time), not ``params``.
        device: where to put the tensors; default: the device of ``params`` if
            given, else the CPU.

    Raises:
        FileNotFoundError: no file at ``path``. IsADirectoryError: ``path`` is a folder.
        ValueError: not a flaplace posterior file, a damaged file, an unsupported version,
            a prior precision that is not positive and finite, non-finite tensors, or
            (naming the first one) a name, shape or dtype mismatch.

    Examples:
        >>> posterior = load_posterior("posterior.safetensors", select_params(model, "lora"))
    """
    if device is None:
        device = next(iter(params.values())).device if params else torch.device("cpu")
    device = torch.device(device)
    names, transposed, stored = _read_posterior_file(path)
    if params is not None:
        _check_against_params(names, stored, params, path)
    mean: Params = {}
    factors: Factors = {}
    precision: dict[str, Tensor] = {}
    for name, flag in zip(names, transposed, strict=True):
        field = {f: stored[f"{name}{KEY_SEPARATOR}{f}"].to(device) for f in FIELDS}
        mean[name] = field["mean"]
        factors[name] = KronFactor(
            S=Eigen(field["S.vectors"], field["S.values"]),
            A=Eigen(field["A.vectors"], field["A.values"]),
            transposed=torch.tensor(flag, device=device),
        )
        precision[name] = field["prior_precision"]
    posterior = Posterior(mean=mean, factors=factors, prior_precision=precision)
    try:
        validate_posterior(posterior)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return posterior


def _read_posterior_file(path: str | PathLike[str]) -> tuple[list[str], list[bool], dict[str, Tensor]]:
    """Names, transposed flags and tensors of a posterior file, with one clear error per kind of damage."""
    location = Path(path)
    if location.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder; pass the posterior file inside it (written by save_posterior, "
            "e.g. posterior.safetensors)"
        )
    if not location.is_file():
        raise FileNotFoundError(f"posterior file {path} does not exist; write one with save_posterior")
    damaged = f"{path} is damaged or not a posterior file (save it again with save_posterior)"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise ValueError(f"{path} is not a flaplace posterior file (no '{FORMAT_NAME}' metadata)")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path} has posterior format version {metadata.get('format_version')!r}; "
                    f"this flaplace reads version {FORMAT_VERSION!r}"
                )
            try:
                names = json.loads(metadata["names"])
                transposed = json.loads(metadata["transposed"])
            except (KeyError, json.JSONDecodeError):
                raise ValueError(f"{damaged}: its block list (metadata) is unreadable") from None
            stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise ValueError(f"{damaged}: {error}") from None
    lists = isinstance(names, list) and isinstance(transposed, list)
    if not lists or len(names) != len(transposed) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{damaged}: its block list and transposed flags do not match")
    if not all(isinstance(t, bool) for t in transposed):
        raise ValueError(f"{damaged}: its transposed flags are not true/false")
    for name in names:
        absent = [f for f in FIELDS if f"{name}{KEY_SEPARATOR}{f}" not in stored]
        if absent:
            raise ValueError(f"{damaged}: block {name!r} has no {absent[0]!r} tensor")
    return names, transposed, stored


def _check_against_params(names: list[str], stored: dict[str, Tensor], params: Params, path: object) -> None:
    for name in names:
        if name not in params:
            raise ValueError(
                f"{path}: saved block {name!r} is not among the model's adapter parameters "
                f"(which look like {next(iter(params))!r})"
            )
    for name in params:
        if name not in names:
            raise ValueError(f"{path}: the model's adapter parameter {name!r} has no saved block")
    for name in names:
        saved = stored[f"{name}{KEY_SEPARATOR}mean"]
        param = params[name]
        if saved.shape != param.shape:
            raise ValueError(
                f"{path}: block {name!r} was saved with shape {tuple(saved.shape)} but the model's "
                f"parameter has shape {tuple(param.shape)}"
            )
        if saved.dtype != param.dtype:
            raise ValueError(
                f"{path}: block {name!r} was saved as {saved.dtype} but the model's parameter is {param.dtype}"
            )


def num_parameters(posterior: Posterior) -> int:
    """The number of scalar weights the posterior covers.

    Examples:
        >>> num_parameters(posterior)
    """
    return sum(math.prod(mean.shape) for mean in posterior.mean.values())
