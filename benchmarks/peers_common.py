"""Helpers shared by the peer comparison scripts: environment, error measures, MAP fitting, bayesian-lora glue."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT, ROOT / "benchmarks", ROOT / "tests"):  # flaplace, _common.py, tiny_models.py
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


import flaplace  # noqa: E402
from flaplace.params import model_inputs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compare_peers.json"
IMAGES = ROOT / "docs" / "img"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SEED = 0

warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
warnings.filterwarnings("ignore", message=".*By default `link_approx` is `probit`.*")
warnings.filterwarnings(
    "ignore", message=".*There is a performance drop because we have not yet implemented.*"
)


# =============================================================================================
# Measuring
# =============================================================================================


def environment() -> dict[str, Any]:
    """Versions, CPU and threads: what produced the numbers."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": {
            name: version(name)
            for name in (
                "torch",
                "transformers",
                "peft",
                "laplace-torch",
                "curvlinops-for-pytorch",
                "asdl",
                "backpack-for-pytorch",
                "bayesian-lora",
                "flaplace",
            )
        },
        "flaplace_version": flaplace.__version__,
    }


def relative(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def scalar_relative(a: float | Tensor, b: float | Tensor) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


# =============================================================================================
# Models shared by the parts
# =============================================================================================


def fit_map(
    model_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: dict[str, Tensor],
    loader: torch.utils.data.DataLoader,
    *,
    steps: int,
    lr: float,
    prior_precision: float,
    n_data: int,
) -> None:
    """MAP adapter weights in place: Adam on the mean NLL + ``lambda / (2N) ||theta||^2``."""
    trainable = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=lr)
    step = 0
    while step < steps:
        for batch in loader:
            logits = model_fn(trainable, batch)
            loss = nn.functional.cross_entropy(logits, batch["labels"])
            loss = loss + prior_precision / (2 * n_data) * sum(p.square().sum() for p in trainable.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trainable[name])


def _bayesian_lora_forward(output_fn: Callable[[Any, Any], Tensor]) -> Callable[[nn.Module, Any], Tensor]:
    """bayesian-lora's ``fwd_call(model, batch) -> logits``, as its README writes it."""

    def fwd_call(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _, inputs = model_inputs(batch)
        return output_fn(model(**inputs), inputs)

    return fwd_call


def _bayesian_lora_factors(model, output_fn, loader, n_kfac, lr_threshold, dtype):
    import bayesian_lora

    factors = bayesian_lora.calculate_kronecker_factors(
        model, _bayesian_lora_forward(output_fn), loader, n_kfac, lr_threshold, ["lora"]
    )
    factors = bayesian_lora.cholesky_decompose_small_factors(factors, lr_threshold, "cpu", dtype)
    model.eval()
    return factors


def _bayesian_lora_tune(model, ll, factors, rank, n_kfac, prior_var=0.1, steps=200):
    """The prior tuning of bayesian-lora's example: AdamW (lr 1e-2) on ``s2``, evidence as the loss."""
    import bayesian_lora

    s2 = torch.tensor(prior_var, requires_grad=True)
    optimizer = torch.optim.AdamW([s2], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = bayesian_lora.model_evidence(model, ll, factors, rank, n_kfac, s2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s2, 1.0)
        optimizer.step()
    return s2.detach()


def _bayesian_lora_predictive(model, output_fn, batch, factors, s2, n_classes, rank, n_kfac):
    import bayesian_lora
    from bayesian_lora.main import jacobian_mean  # not re-exported by the package
    from transformers import BatchEncoding

    _, inputs = model_inputs(batch)
    encoding = BatchEncoding(dict(inputs))
    callback = lambda outputs: output_fn(outputs, inputs)  # noqa: E731
    jacobian, f_mu = jacobian_mean(model, encoding, output_callback=callback)
    f_var = bayesian_lora.variance(encoding, jacobian, factors, s2, n_classes, rank, n_kfac, "cpu")
    return f_mu.detach(), f_var.detach()
