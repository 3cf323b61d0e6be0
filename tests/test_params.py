"""ModelFunction: logits of the needed positions only (logits_to_keep), and when that is off."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ANSWERS, padded_batch, tiny_lora_model

from flaplace.jacobians import per_example_jacobians
from flaplace.kfac import build
from flaplace.kfac_state import kfac_factors
from flaplace.params import LastTokenLogits, ModelFunction, classifier_logits, select_params


def _right_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same examples with the padding moved to the right (the last real token moves)."""
    mask = batch["attention_mask"]
    order = torch.argsort(1 - mask, dim=1, stable=True)  # real tokens first, in order
    return {
        **batch,
        "input_ids": batch["input_ids"].gather(1, order),
        "attention_mask": mask.gather(1, order),
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_trimmed_logits_equal_the_full_ones(arch, padding):
    model = tiny_lora_model(arch)
    params = select_params(model, "lora")
    trimmed = ModelFunction(model, params, LastTokenLogits(ANSWERS))
    full = ModelFunction(model, params, LastTokenLogits(ANSWERS), trim_logits=False)
    assert trimmed.trim_logits and not full.trim_logits
    batch = padded_batch(arch)
    if padding == "right":
        batch = _right_padded(batch)
    # The model really is asked for one position per example.
    kept = model(input_ids=batch["input_ids"], **trimmed.output_fn.model_kwargs(batch))
    assert kept.logits.shape[:2] == (3, 1)

    torch.testing.assert_close(trimmed(params, batch), full(params, batch), rtol=1e-12, atol=1e-12)
    for fisher in ("exact", "empirical"):
        ours, reference = (_factors(f, params, batch, fisher) for f in (trimmed, full))
        for name in params:
            for side in ("S", "A"):
                a, b = getattr(ours[name], side), getattr(reference[name], side)
                torch.testing.assert_close(a.values, b.values, rtol=1e-9, atol=1e-12)
    for name, jac in per_example_jacobians(trimmed, params, batch, method="capture").items():
        torch.testing.assert_close(
            jac, per_example_jacobians(full, params, batch, method="loop")[name], rtol=1e-9, atol=1e-12
        )


def _factors(model_fn, params, batch, fisher):
    init, update = build(model_fn, fisher=fisher, lr_threshold=None)
    return kfac_factors(update(init(params), params, batch))


def test_no_trimming_when_the_head_itself_is_adapted_or_absent():
    model = tiny_lora_model("llama")
    on_head = tiny_lora_model("llama", targets=["q_proj", "lm_head"])
    assert not ModelFunction(on_head, select_params(on_head, "lora"), LastTokenLogits(ANSWERS)).trim_logits
    assert ModelFunction(model, select_params(model, "lora"), LastTokenLogits(ANSWERS)).trim_logits
    bert = tiny_lora_model("bert")
    assert not ModelFunction(bert, select_params(bert, "lora"), classifier_logits).trim_logits
    assert not ModelFunction(bert, select_params(bert, "lora"), LastTokenLogits(ANSWERS)).trim_logits


def test_training_function_keeps_dropout_and_the_default_turns_it_off():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Dropout(0.5)).train()
    params = {"0.weight": net[0].weight}
    f = ModelFunction(net, params, lambda out, batch: out)
    x = {"input": torch.ones(8, 6)}
    reference = net.eval()(x["input"])  # eval mode by hand: the independent reference
    net.train()
    torch.testing.assert_close(f(params, x), reference)
    assert net.training  # the module's own mode is left as it was
    trained = f.training()
    first, second = trained(params, x), trained(params, x)
    assert not torch.equal(first, second)  # dropout is on: two draws of the mask differ
    # every entry is either dropped (0) or the eval output scaled by 1 / (1 - p)
    for out in (first, second):
        kept = out != 0
        torch.testing.assert_close(out[kept], (reference * 2)[kept])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_the_model_is_asked_for_no_key_value_cache(arch):
    """Decoders build a key/value cache for generation by default; ModelFunction asks for none,
    and its values are the model's own with the cache."""
    model = tiny_lora_model(arch)
    params = select_params(model, "lora")
    batch = padded_batch(arch)
    seen = []  # the model's outputs, as the output function receives them
    raw = ModelFunction(model, params, lambda output, batch: seen.append(output) or output.logits)
    assert raw.no_cache
    with_cache = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
    assert with_cache.past_key_values is not None  # what the default would build
    logits = raw.evaluate(params, batch)
    assert seen[-1].past_key_values is None
    torch.testing.assert_close(logits, with_cache.logits, rtol=1e-12, atol=1e-12)
    # a batch that asks for the cache itself keeps it
    raw.evaluate(params, {**batch, "use_cache": True})
    assert seen[-1].past_key_values is not None
    # a model without the argument is called as before
    net = torch.nn.Linear(3, 2)
    assert not ModelFunction(net, ["weight"], classifier_logits).no_cache
