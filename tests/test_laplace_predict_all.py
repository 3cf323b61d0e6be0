"""Predictions for many inputs at once: `LaplaceLoRA.predict_all` over a whole DataLoader."""

from __future__ import annotations

import peft
import torch
from tiny_models import padded_batch

from flaplace.laplace import LaplaceLoRA
from flaplace.links import predictive_probs
from flaplace.predictive import linearised_predictive, predictive_precompute

F64 = torch.float64


def tiny_bert(seed: int = 0):
    from tiny_models import tiny_base_model

    torch.manual_seed(seed)
    base = tiny_base_model("bert", attn_implementation="eager", initializer_range=0.2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    model = model.to(F64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


class Rows(torch.utils.data.Dataset):
    """The rows of one padded batch as a map-style dataset of per-example dicts."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def test_predict_all_over_a_data_loader_concatenates_every_output_in_order():
    model = tiny_bert()
    la = LaplaceLoRA(model, prior_precision=3.0, fisher="exact", jacobian_method="loop", directions="all")
    la.fit([padded_batch("bert", n=4, length=6, seed=s) for s in (1, 2)])
    data = padded_batch("bert", n=7, length=6, seed=9)
    loader = torch.utils.data.DataLoader(Rows(data), batch_size=3)  # batches of 3, 3 and 1
    probs, labels = la.predict_all(loader)
    assert probs.shape == (7, 3) and torch.equal(labels, data["labels"])
    # reference: each example alone through the pure functions (the outputs do not depend on batching)
    for i in range(7):
        one = {k: v[i : i + 1] for k, v in data.items()}
        cache = predictive_precompute(la.posterior, la.directions)
        f_mu, f_var = linearised_predictive(la.model_fn, cache, one, method="loop")
        torch.testing.assert_close(probs[i : i + 1], predictive_probs(f_mu, f_var, "probit"))
    bridge, _ = la.predict_all(loader, link="bridge")  # the link is passed through
    assert not torch.allclose(bridge, probs)
    sampled, _ = la.predict_all(
        loader, pred_type="nn", n_samples=16, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.shape == (7, 3)
    torch.testing.assert_close(sampled.sum(-1), torch.ones(7, dtype=sampled.dtype))
    # no labels in the batches: probabilities only
    first = next(iter(loader))
    probs_only, none = la.predict_all([{k: v for k, v in first.items() if k != "labels"}])
    assert none is None
    torch.testing.assert_close(probs_only, probs[:3])
