"""The pipeline's seeding: ``transformers.set_seed`` inside a block that restores every generator."""

from __future__ import annotations

import random

import numpy as np
import torch

from flaplace.app.pipeline import seeded


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seeded_seeds_python_numpy_and_torch_and_restores_their_states():
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    outside = draws()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    with seeded(7):
        first = draws()
    assert draws() == outside  # the block left every generator where it was
    with seeded(7):
        assert draws() == first
    with seeded(8):
        assert draws() != first
    # the same draws as transformers.set_seed (what a Trainer run starts with)
    from transformers import set_seed

    set_seed(7)
    assert draws() == first
