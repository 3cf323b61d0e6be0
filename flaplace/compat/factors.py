"""``calculate_kronecker_factors``: bayesian-lora's K-FAC entry point on flaplace's hook-free K-FAC."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from flaplace.compat.roots import factor_root
from flaplace.kfac import fit as fit_kfac
from flaplace.params import token_mask
from flaplace.typing import Batch, Params

#: ``{module name: (A_root, S_root)}`` with ``A = A_root A_root^T`` (input side) and
#: ``S = S_root S_root^T`` (output-gradient side); a root is ``(d, d)`` or ``(d, n_kfac)``.
KFACFactors: TypeAlias = dict[str, tuple[Tensor, Tensor]]

ForwardCall: TypeAlias = Callable[[nn.Module, Any], Tensor]


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

    ``forward_call(model, batch)`` is run under `torch.func.functional_call` (through a
    wrapper module, so the tensors flaplace differentiates are the ones the layers use) and
    flaplace's hook-free K-FAC ([`flaplace.kfac.fit`][flaplace.kfac.fit]) accumulates the factors with
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

    Examples:
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

    factors, _ = fit_kfac(
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
    )
    return {module_of[name]: (factor_root(f.A), factor_root(f.S)) for name, f in factors.items()}


def _looks_like_probabilities(logits: Tensor) -> bool:
    if logits.shape[-1] < 2 or not bool(torch.isfinite(logits).all()):
        return False
    sums = logits.sum(-1)
    return bool((logits >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-5))
