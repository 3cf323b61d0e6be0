"""The functional factors equal a plain hook-based implementation, written here with explicit loops."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ANSWERS, padded_batch, tiny_lora_model

from flaplace.fisher import fisher_cotangents
from flaplace.kfac import build
from flaplace.kfac_state import kfac_factors
from flaplace.params import LastTokenLogits, ModelFunction, classifier_logits, select_params


def _full(eigen):
    return eigen.dense()


def hook_reference(model, names, output_fn, batch, sharing):
    """S and A by forward hooks on the LoRA Linear modules and autograd.grad, loop by loop."""
    modules = dict(model.named_modules())
    inputs, outputs, handles = {}, {}, []
    for name in names:
        module = modules[name.rsplit(".", 1)[0]]

        def keep(mod, args, out, name=name):
            inputs[name], outputs[name] = args[0].detach(), out

        handles.append(module.register_forward_hook(keep))
    try:
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        logits = output_fn(model(**kwargs), batch)
    finally:
        for h in handles:
            h.remove()
    cotangents = fisher_cotangents(logits.detach(), "categorical", "exact")
    grads = {n: [] for n in names}
    for v in cotangents:
        got = torch.autograd.grad(logits, [outputs[n] for n in names], v, retain_graph=True)
        for n, g in zip(names, got, strict=True):
            grads[n].append(g)
    mask = batch["attention_mask"].bool()
    result = {}
    for n in names:
        o, i = outputs[n].shape[-1], inputs[n].shape[-1]
        S = torch.zeros(o, o, dtype=logits.dtype)
        A = torch.zeros(i, i, dtype=logits.dtype)
        count = 0
        for b in range(mask.shape[0]):
            real = [t for t in range(mask.shape[1]) if mask[b, t]]
            if sharing == "expand":
                for t in real:
                    A += torch.outer(inputs[n][b, t], inputs[n][b, t])
                    count += 1
                    for g in grads[n]:
                        S += torch.outer(g[b, t], g[b, t])
            elif sharing == "reduce":
                a = sum(inputs[n][b, t] for t in real) / len(real)
                A += torch.outer(a, a)
                count += 1
                for g in grads[n]:
                    s = sum(g[b, t] for t in real)
                    S += torch.outer(s, s)
            else:
                t = real[-1]
                A += torch.outer(inputs[n][b, t], inputs[n][b, t])
                count += 1
                for g in grads[n]:
                    S += torch.outer(g[b, t], g[b, t])
        result[n] = (S, A / count)
    return result


@pytest.mark.parametrize("arch", ["llama", "phi", "mistral", "gpt2", "bert"])
@pytest.mark.parametrize("sharing", ["expand", "reduce", "last"])
def test_factors_equal_hook_reference(arch, sharing):
    model = tiny_lora_model(arch)
    params = select_params(model, "lora")
    output_fn = classifier_logits if arch == "bert" else LastTokenLogits(ANSWERS)
    model_fn = ModelFunction(model, params, output_fn)
    batches = [padded_batch(arch, n=3, seed=1), padded_batch(arch, n=2, length=5, seed=2)]
    init, update = build(model_fn, fisher="exact", sharing=sharing, lr_threshold=None)
    state = init(params)
    for batch in batches:
        state = update(state, params, batch)
    factors = kfac_factors(state)
    refs = [hook_reference(model, list(params), output_fn, batch, sharing) for batch in batches]
    sizes = [len(b["input_ids"]) for b in batches]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    weights = tokens if sharing == "expand" else sizes
    for name in params:
        S = sum(r[name][0] for r in refs)
        A = sum(w * r[name][1] for w, r in zip(weights, refs, strict=True)) / sum(weights)
        assert torch.allclose(_full(factors[name].S), S, rtol=1e-6, atol=1e-9 * float(S.norm())), name
        assert torch.allclose(_full(factors[name].A), A, rtol=1e-6, atol=1e-9 * float(A.norm())), name
