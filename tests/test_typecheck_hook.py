"""The jaxtyping + beartype import hook from conftest.py is active on flaplace's modules."""

from __future__ import annotations

import pytest
import torch
from beartype.roar import BeartypeCallHintViolation
from jaxtyping import TypeCheckError

import flaplace.params as params

#: What the hook raises: jaxtyping re-raises beartype's violations as its own TypeCheckError.
VIOLATION = (TypeCheckError, BeartypeCallHintViolation)


def test_hook_checks_argument_types() -> None:
    # Unchecked, the body would fail with AttributeError on `3.named_modules()`.
    with pytest.raises(VIOLATION, match="model"):
        params.transposed_weights(3, ["weight"])  # type: ignore[arg-type]


def test_hook_checks_return_types() -> None:
    # Unchecked, logits_of would happily return the string.
    with pytest.raises(VIOLATION, match="return value"):
        params.logits_of({"logits": "not a tensor"})


def test_hook_checks_jaxtyping_dtypes() -> None:
    # The return annotation is Float[Tensor, "batch classes"]: integer logits violate it.
    with pytest.raises(VIOLATION, match="return value"):
        params.classifier_logits(torch.zeros(2, 3, dtype=torch.long), {})
    # A float tensor of the annotated rank passes.
    out = params.classifier_logits(torch.zeros(2, 3), {})
    assert out.shape == (2, 3)


def test_hook_covers_modules_imported_later() -> None:
    import importlib

    module = importlib.import_module("flaplace.typing")
    assert module.__name__ == "flaplace.typing"
    # Every function defined in flaplace.params is wrapped by beartype (it keeps __wrapped__).
    assert hasattr(params.select_params, "__wrapped__")
