"""``flaplace run --prior-mean init``: the MAP's L2 term and the posterior share the adapters' initialisation."""

from __future__ import annotations

import pytest
import torch
from test_pipeline import config, data, models, root  # noqa: F401  (module fixtures)
from tiny_hf import TARGETS

from flaplace.app import hf, lora, stages
from flaplace.app.config import stage_key
from flaplace.app.pipeline import run, seeded
from flaplace.evidence import log_marginal_likelihood
from flaplace.posterior_io import load_posterior


def test_train_map_with_a_prior_mean_reaches_the_centred_map():
    """train_map minimises mean NLL + lambda/(2N) ||theta - m||^2: at its end that gradient vanishes."""
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(40, dtype=torch.float64) > 0).long()
    centre = {"w": torch.full((2, 3), 2.0, dtype=torch.float64)}

    def batches():
        while True:
            yield {"labels": y, "x": x}

    lam = 40.0
    trained, _ = stages.train_map(
        lambda p, b: b["x"] @ p["w"].T, {"w": torch.zeros(2, 3, dtype=torch.float64)}, ["w"], batches(),
        n_train=40, steps=1500, lr=0.05, prior_precision=lam, progress=False, prior_mean=centre,
    )  # fmt: skip
    w = trained["w"].clone().requires_grad_(True)
    objective = torch.nn.functional.cross_entropy(x @ w.T, y) + lam / 80 * (w - centre["w"]).square().sum()
    (grad,) = torch.autograd.grad(objective, w)
    assert float(grad.norm()) < 1e-3
    assert float((trained["w"] - centre["w"]).abs().max()) < 1.0  # pulled to the centre, not to 0


def test_run_with_init_prior_mean_saves_the_initialisation(models, data, tmp_path):  # noqa: F811
    options = config(models, data, "llama", "arc_easy", tmp_path, prior_mean="init")
    assert stage_key(options, "map") != stage_key(config(models, data, "llama", "arc_easy", tmp_path), "map")
    results = run(options, progress=False)
    # the adapters as the run initialised them (same seed, same attachment)
    with seeded(options.seed):
        loaded = hf.load_model(models["llama"], n_classes=4)
        model = lora.attach_lora(loaded, rank=2, alpha=4.0, targets=TARGETS["llama"])
    names = lora.laplace_param_names(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    posterior = load_posterior(tmp_path / "posterior.safetensors", start)
    assert posterior.prior_mean is not None
    for n in names:
        torch.testing.assert_close(posterior.prior_mean[n], start[n], rtol=0, atol=0)
    assert any(not torch.equal(posterior.mean[n], start[n]) for n in names)
    recomputed = float(log_marginal_likelihood(posterior, results["train_log_likelihood"]).detach())
    assert recomputed == pytest.approx(results["log_evidence"], rel=1e-5)
    shifted = posterior._replace(mean={n: posterior.mean[n] - start[n] for n in names}, prior_mean=None)
    assert float(log_marginal_likelihood(shifted, results["train_log_likelihood"])) == pytest.approx(
        recomputed, rel=1e-9
    )
