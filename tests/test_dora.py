"""DoRA and LoRA on embeddings with real PEFT: refused in one line, and the documented fallback.

References: the per-example gradient of one DoRA layer's real function (the row norm not detached),
computed here by hand from the layer's tensors and checked against PEFT's own forward, is not an
outer product (its second singular value is far from zero) while PEFT's detached-norm forward's is;
so no Kronecker factorisation holds and the refusal is the right answer. The fallback (merge the
adapter, then a posterior over full weights of the merged model) is checked to keep the DoRA
model's logits and to give a fitted, normalised predictive.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import ANSWERS, padded_batch, tiny_base_model

from flaplace.laplace import LaplaceLoRA
from flaplace.params import LastTokenLogits, ModelFunction, logits_of, model_inputs, select_params


def dora_model(arch: str = "llama", *, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    """A tiny random model with a DoRA adapter whose weights are random, as after training."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, use_dora=True, target_modules=list(targets))
    model = peft.get_peft_model(tiny_base_model(arch), config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return model


@pytest.mark.parametrize("exclude", [(), ("magnitude",)])
def test_dora_is_refused_in_one_line_naming_dora(exclude):
    model = dora_model()
    with pytest.raises(ValueError, match=r"DoRA layer .*q_proj'.*use_dora=True.*merge_and_unload") as info:
        LaplaceLoRA(model, LastTokenLogits(ANSWERS), exclude=exclude)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="DoRA layer"):  # the same when names are passed directly
        ModelFunction(model, ["base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"])


def test_only_dora_layers_are_refused():
    """DoRA on q_proj only: the plain LoRA layers (v_proj) and other weights stay selectable."""
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], use_dora=True, layers_to_transform=[0]
    )  # DoRA on layer 0 only
    model = peft.get_peft_model(tiny_base_model("llama"), config).double().eval()
    with pytest.raises(ValueError, match="DoRA layer"):
        select_params(model, "lora")
    params = select_params(model, "lm_head")
    assert list(params) == ["base_model.model.lm_head.weight"]


def test_dora_gradient_is_not_an_outer_product():
    """Why K-FAC cannot hold: one input, one output direction, and the lora_A gradient has rank > 1."""
    model = dora_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude, scale = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(w0.shape[1], dtype=torch.float64, generator=g)
    direction = torch.randn(w0.shape[0], dtype=torch.float64, generator=g)

    def dora(a_: torch.Tensor, detach_norm: bool) -> torch.Tensor:
        weight = w0 + scale * b @ a_
        norm = torch.linalg.norm(weight, dim=1)
        norm = norm.detach() if detach_norm else norm
        return (magnitude / norm) * (weight @ x)

    with torch.no_grad():  # the hand-written function is PEFT's layer
        torch.testing.assert_close(dora(a, False) + _bias(layer), layer(x[None])[0], rtol=0, atol=1e-12)
    for detach_norm, outer in ((True, True), (False, False)):
        grad = torch.func.grad(lambda a_, d=detach_norm: direction @ dora(a_, d))(a.detach())
        singular = torch.linalg.svdvals(grad)
        ratio = float(singular[1] / singular[0]) if singular[0] > 0 else 0.0
        assert (ratio < 1e-10) if outer else (ratio > 1e-3), (detach_norm, ratio)


def _bias(layer: torch.nn.Module) -> torch.Tensor:
    bias = layer.base_layer.bias
    return torch.zeros(()) if bias is None else bias


def test_lora_on_embeddings_is_refused_and_exclude_embed_works():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = peft.get_peft_model(tiny_base_model("llama"), config).double().eval()
    with pytest.raises(
        ValueError, match=r"lora_embedding_A.*embedding .*embed_tokens'.*exclude=\"embed\""
    ) as info:
        LaplaceLoRA(model, LastTokenLogits(ANSWERS))
    assert "\n" not in str(info.value)
    la = LaplaceLoRA(model, LastTokenLogits(ANSWERS), exclude="embed")
    assert la.params and not any("embed" in n for n in la.params)
    la.fit([padded_batch("llama")])
    assert la.posterior is not None


def _logits(model, batch):
    args, kwargs = model_inputs(batch)
    with torch.no_grad():
        return logits_of(model(*args, **kwargs))


@pytest.mark.parametrize(
    ("arch", "include", "output_fn"),
    [
        ("llama", "layers.1.self_attn.v_proj", LastTokenLogits(ANSWERS)),
        ("bert", "classifier.weight", None),
    ],
)
def test_dora_fallback_merge_then_full_weight_posterior(arch, include, output_fn):
    """The documented fallback: merge the DoRA adapter, then a posterior over full weights."""
    targets = ("q_proj", "v_proj") if arch == "llama" else ("query", "value")
    model = dora_model(arch, targets=targets)
    batch = padded_batch(arch)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), _logits(model, batch), rtol=0, atol=1e-10)
    options = {} if output_fn is None else {"output_fn": output_fn}
    # The whole posterior: on six examples no direction of a full weight matrix is informed
    # beyond the evidence's prior, so the informed predictive would be the MAP's.
    la = LaplaceLoRA(merged, include=include, directions="all", **options)
    la.fit([batch, padded_batch(arch, seed=2)])
    assert len(la.params) == 1 and next(iter(la.params)).endswith("weight")
    la.optimize_prior_precision()
    probs = la(batch)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, dtype=probs.dtype))
    map_probs = la.model_fn(la.params, batch).softmax(-1)
    assert torch.isfinite(probs).all()
    assert (probs - map_probs).abs().max() > 1e-8  # the posterior moves the MAP's predictive
