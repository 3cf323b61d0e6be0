"""Checking, saving and loading a Laplace posterior.

[`validate_posterior`][flaplace.posterior_io.validate_posterior] is the one check every entry point
runs (making a posterior, changing its prior precision, loading it, the evidence);
[`save_posterior`][flaplace.posterior_io.save_posterior] and
[`load_posterior`][flaplace.posterior_io.load_posterior] write and read a posterior as a safetensors
file, checked on the way in against the model's adapter weights.
"""

from __future__ import annotations

import json
import math
from os import PathLike
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from flaplace.typing import Eigen, Factors, KronFactor, Params, Posterior

__all__ = ["check_blocks", "check_prior_mean", "load_posterior", "save_posterior", "validate_posterior"]

#: Version of the on-disk layout written by `save_posterior`.
FORMAT_VERSION = "1"
FORMAT_NAME = "flaplace.posterior"
#: Separates a block's name from its field in a safetensors key. Torch parameter
#: names are dotted identifiers, so ``"|"`` never appears in them (checked on save).
KEY_SEPARATOR = "|"
FIELDS = ("mean", "S.vectors", "S.values", "A.vectors", "A.values", "prior_precision")
#: The optional field of every block when the posterior has a prior mean (metadata ``prior_mean``).
PRIOR_MEAN_FIELD = "prior_mean"


# --------------------------------------------------------------------------- checks


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
        >>> check_blocks(factors, params)  # silent when they match
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


def check_prior_mean(prior_mean: Params, params: Params, *, finite: bool = True) -> None:
    """Check that a prior mean has exactly the names and shapes of ``params``' blocks (and finite values).

    ``finite=False`` skips reading the values (names and shapes only).

    Raises:
        ValueError: naming the first block that is missing, unknown, misshapen or not finite.

    Examples:
        >>> check_prior_mean({"W": torch.zeros(2, 3)}, {"W": torch.ones(2, 3)})  # silent when they match
        >>> check_prior_mean({"W": torch.zeros(3, 2)}, {"W": torch.ones(2, 3)})
        Traceback (most recent call last):
        ...
        ValueError: prior_mean of 'W' has shape (3, 2) but the block's weight has shape (2, 3)
    """
    if not isinstance(prior_mean, dict):
        raise TypeError(
            f"prior_mean must be a dict of tensors keyed by parameter name (or None), got {type(prior_mean).__name__}"
        )
    missing = [n for n in params if n not in prior_mean]
    if missing:
        raise ValueError(
            f"prior_mean has no tensor for block {missing[0]!r} ({len(missing)} missing); give one per block"
        )
    extra = [n for n in prior_mean if n not in params]
    if extra:
        raise ValueError(f"prior_mean has a tensor for {extra[0]!r}, which is not a block of the posterior")
    for name, param in params.items():
        centre = prior_mean[name]
        if not isinstance(centre, Tensor) or tuple(centre.shape) != tuple(param.shape):
            shape = tuple(centre.shape) if isinstance(centre, Tensor) else type(centre).__name__
            raise ValueError(
                f"prior_mean of {name!r} has shape {shape} but the block's weight has shape {tuple(param.shape)}"
            )
        if finite and not bool(torch.isfinite(centre).all()):
            raise ValueError(f"prior_mean of {name!r} is not finite")


def validate_posterior(posterior: Posterior, *, values: bool = True) -> None:
    """Check that ``posterior`` is a usable Laplace posterior; raise naming the first problem.

    The one validation every entry point runs (`make_posterior`, `load_posterior`,
    `with_prior_precision`, the evidence): the same names in ``mean``, ``factors`` and
    ``prior_precision``; each block a matrix whose factors fit its shape (`check_blocks`);
    each prior precision a single positive, finite number; a prior mean, when there is one,
    with the names and shapes of the blocks (`check_prior_mean`).

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
    if posterior.prior_mean is not None:
        check_prior_mean(posterior.prior_mean, posterior.mean, finite=values)
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


# --------------------------------------------------------------------------- save / load


def save_posterior(path: str | PathLike[str], posterior: Posterior) -> None:
    """Write a posterior to a safetensors file.

    Keys are ``"<parameter name>|<field>"``; the metadata records the format
    version, the block names in order and their transposed flags. Prior
    precisions are saved detached; a prior mean, when the posterior has one, is saved
    as one more field per block (and read back by `load_posterior`).

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
        if posterior.prior_mean is not None:
            centre = posterior.prior_mean[name]
            tensors[f"{name}{KEY_SEPARATOR}{PRIOR_MEAN_FIELD}"] = centre.detach().contiguous().clone()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "names": json.dumps(list(posterior.mean)),
        "transposed": json.dumps([bool(posterior.factors[n].transposed) for n in posterior.mean]),
        "prior_mean": json.dumps(posterior.prior_mean is not None),
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
        >>> save_posterior("posterior.safetensors", posterior)
        >>> posterior = load_posterior("posterior.safetensors", params)
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
    centred = any(key.endswith(f"{KEY_SEPARATOR}{PRIOR_MEAN_FIELD}") for key in stored)
    prior_mean: Params | None = {} if centred else None
    for name, flag in zip(names, transposed, strict=True):
        field = {f: stored[f"{name}{KEY_SEPARATOR}{f}"].to(device) for f in FIELDS}
        mean[name] = field["mean"]
        factors[name] = KronFactor(
            S=Eigen(field["S.vectors"], field["S.values"]),
            A=Eigen(field["A.vectors"], field["A.values"]),
            transposed=torch.tensor(flag, device=device),
        )
        precision[name] = field["prior_precision"]
        if prior_mean is not None:
            key = f"{name}{KEY_SEPARATOR}{PRIOR_MEAN_FIELD}"
            if key not in stored:
                raise ValueError(f"{path} is damaged: block {name!r} has no {PRIOR_MEAN_FIELD!r} tensor")
            prior_mean[name] = stored[key].to(device)
    posterior = Posterior(mean=mean, factors=factors, prior_precision=precision, prior_mean=prior_mean)
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
