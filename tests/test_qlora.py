"""QLoRA: PEFT LoRA over bitsandbytes NF4 ``Linear4bit`` layers, on CPU.

Reference: the de-quantised float twin. The same saved tiny Llama is loaded once quantised to NF4
(``BitsAndBytesConfig``, ``device_map="cpu"``) and once in float32; every base weight of the twin
is replaced by the NF4 layer's de-quantised weight, and both get the same LoRA adapters. With a
float32 compute dtype the NF4 layer computes ``x @ dequantise(W)^T``, so the K-FAC factors, the
evidence and the linearised predictive must be EQUAL to the twin's (no tolerance).
"""

from __future__ import annotations

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from tiny_models import tiny_base_model

from flaplace.jacobians import per_example_jacobians
from flaplace.kfac import fit
from flaplace.laplace import fit_laplace_lora
from flaplace.params import LastTokenLogits, ModelFunction, select_params
from flaplace.posterior import make_posterior
from flaplace.predictive import linearised_predictive

ANSWERS = [3, 5, 7]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def quantised_and_twin(tmp_path):
    """The NF4 model and its de-quantised float32 twin, both with the same random LoRA adapters."""
    torch.manual_seed(0)
    # hidden 64: NF4 quantises in blocks of 64 inputs
    original = tiny_base_model("llama", hidden=64, attn_implementation="eager", initializer_range=0.2)
    original.save_pretrained(tmp_path / "tiny")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    load = transformers.AutoModelForCausalLM.from_pretrained
    quantised = load(tmp_path / "tiny", quantization_config=config, device_map="cpu", dtype=torch.float32)
    twin = load(tmp_path / "tiny", device_map="cpu", dtype=torch.float32)
    layers = {n: m for n, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14  # q, k, v, o, gate, up, down of 2 layers (the head stays float)
    with torch.no_grad():
        for name, layer in layers.items():
            float_weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            twin.get_submodule(name).weight.copy_(float_weight)
    moved = twin.get_submodule(next(iter(layers))).weight - original.get_submodule(next(iter(layers))).weight
    assert float(moved.abs().max()) > 1e-3  # NF4 rounding is real: the twin is not the original
    lora = peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    models = []
    for model in (quantised, twin):
        torch.manual_seed(1)
        models.append(peft.get_peft_model(model, lora).eval())
    return models


def batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(8, 48, (4, 6), generator=g),
            "attention_mask": torch.tensor([[1] * 6, [1] * 6, [0, 1, 1, 1, 1, 1], [1] * 6]),
            "labels": torch.randint(0, len(ANSWERS), (4,), generator=g),
        }
        for _ in range(n)
    ]


def test_qlora_gives_the_factors_and_predictive_of_its_dequantised_twin(tmp_path):
    quantised, twin = quantised_and_twin(tmp_path)
    base = quantised.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(base.base_layer, bnb.nn.Linear4bit)
    support = base.base_layer.support_avx512bf16_for_cpu
    data = batches()
    results = []
    for model in (quantised, twin):
        params = select_params(model, "lora")
        f = ModelFunction(model, params, LastTokenLogits(ANSWERS))
        with torch.no_grad():  # on an AVX512-BF16 CPU this would pack the weights (no gradient after)
            f(params, data[0])
        factors, state = fit(f, params, data, fisher="exact", lr_threshold=None, progress=False)
        f_mu, f_var = linearised_predictive(f, make_posterior(factors, params, 1.0), data[0])
        torch.manual_seed(2)
        la = fit_laplace_lora(model, data, LastTokenLogits(ANSWERS))  # the one call: MC Fisher, evidence
        results.append(
            [*torch.utils._pytree.tree_leaves(factors), state.log_likelihood, f_mu, f_var, la(data[1])]
        )
    assert float(results[0][-2].abs().max()) > 1e-3  # a real predictive variance
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    # flaplace's calls left bitsandbytes' CPU kernel choice as it was, and nothing packed
    assert base.base_layer.support_avx512bf16_for_cpu == support
    assert not getattr(base.base_layer.weight.quant_state, "packing_format_for_cpu", False)


def test_qlora_refusals_name_the_cause(tmp_path):
    quantised, _ = quantised_and_twin(tmp_path)
    params = select_params(quantised, "lora")
    f = ModelFunction(quantised, params, LastTokenLogits(ANSWERS))
    batch = batches(1)[0]
    # bitsandbytes' 4-bit matmul reads tensor values and is an autograd.Function without torch.func support
    with pytest.raises(
        RuntimeError, match=r"vmap could not trace .*bitsandbytes 4-bit layers\); use method='capture'"
    ):
        per_example_jacobians(f, params, batch, method="vmap")  # it reads tensor values first
    with pytest.raises(RuntimeError, match=r"method='loop' .*autograd.Function .*method='capture'"):
        per_example_jacobians(f, params, batch, method="loop")
    assert per_example_jacobians(f, params, batch)[next(iter(params))].abs().max() > 0  # auto: capture
    # a forward without gradients in eval mode, outside flaplace, packs the weights for the CPU
    # kernel (forced here: it is on by default only on AVX512-BF16 CPUs); its output has no gradient
    layers = [m for m in quantised.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        quantised(input_ids=batch["input_ids"])
    assert layers[0].weight.quant_state.packing_format_for_cpu
    with pytest.raises(
        RuntimeError,
        match=r"packed by bitsandbytes for its CPU inference kernel .*support_avx512bf16_for_cpu = False",
    ):
        per_example_jacobians(f, params, batch)
