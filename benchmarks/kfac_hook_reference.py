"""The hook-based K-FAC and the bayesian-lora call that `kfac_hook_vs_functional.py` measures.

``HookKFAC`` is a plain reference implementation of the conventional approach (forward hooks on the
LoRA ``nn.Linear`` modules, ``torch.autograd.grad`` per Fisher cotangent, dense factors with
flaplace's normalisation); ``bayesian_lora_factors`` calls bayesian-lora as its README does. Hooks
are fine here: this is benchmark code, outside ``flaplace/``.
"""

from __future__ import annotations

import _common as common
import torch
import torch.nn.functional as F

#: bayesian-lora's low-rank settings (its README's), shared with flaplace's low-rank case.
LOWRANK = {"n_kfac": 10, "lr_threshold": 100}


# ------------------------------------------------------------------------------------------------
# The hook-based K-FAC (reference implementation of the conventional approach)
# ------------------------------------------------------------------------------------------------


def fisher_vectors(logits: torch.Tensor, fisher: str, generator: torch.Generator | None) -> torch.Tensor:
    """Cotangents ``(K, B, C)`` of the logits whose outer products sum to the Fisher type's matrix."""
    probs = logits.softmax(-1)
    classes = probs.shape[-1]
    if fisher == "exact":  # columns of a square root of diag(p) - p p^T
        return torch.stack(
            [
                probs[:, c : c + 1].sqrt()
                * (F.one_hot(torch.full_like(probs[:, 0], c).long(), classes) - probs)
                for c in range(classes)
            ]
        )
    sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return (F.one_hot(sampled, classes).to(probs.dtype) - probs)[None]


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask * torch.arange(mask.shape[1], dtype=mask.dtype, device=mask.device)).argmax(1)


def gradient_rows(grads: torch.Tensor, mask: torch.Tensor, sharing: str) -> torch.Tensor:
    """Rows ``(n, o)`` of output gradients ``(B, T, o)`` whose outer products sum to one batch's ``S``."""
    if sharing == "expand":
        return (grads * mask[..., None]).flatten(0, 1)
    if sharing == "reduce":
        return (grads * mask[..., None]).sum(1)
    return grads[torch.arange(mask.shape[0], device=mask.device), _last_positions(mask)]


def input_rows(inputs: torch.Tensor, mask: torch.Tensor, sharing: str) -> torch.Tensor:
    """Rows ``(n, i)`` of layer inputs ``(B, T, i)`` whose outer products sum to one batch's (unnormalised) ``A``."""
    if sharing == "expand":
        return (inputs * mask[..., None]).flatten(0, 1)
    if sharing == "reduce":
        return (inputs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return inputs[torch.arange(mask.shape[0], device=mask.device), _last_positions(mask)]


def logits_kwargs(batch: dict, trim: bool) -> dict:
    """The model call of flaplace's ``ModelFunction`` (``trim``): ``logits_to_keep`` for the last
    real position of each example and no key/value cache (``use_cache=False``); or the model's
    defaults, as bayesian-lora's example calls it."""
    if not trim:
        return {}
    return {"logits_to_keep": _last_positions(batch["attention_mask"])[:, None], "use_cache": False}


class HookKFAC:
    """Dense K-FAC of the LoRA ``nn.Linear`` modules with forward hooks and ``autograd.grad``.

    ``S`` sums over the data, ``A`` averages (flaplace's normalisation); one backward pass per
    Fisher cotangent (``C`` for ``exact``, one for ``mc``).
    """

    def __init__(self, model, output_fn, *, fisher: str, sharing: str, generator=None, trim: bool = False):
        self.model = model
        self.output_fn = output_fn
        self.fisher, self.sharing, self.generator = fisher, sharing, generator
        self.trim = trim  # the last position's logits only, no cache (as flaplace's ModelFunction)
        self.modules = {
            name: m for name, m in model.named_modules() if name in common.lora_module_names(model)
        }

    def init(self) -> dict:
        p = next(self.model.parameters())
        zeros = lambda d: torch.zeros(d, d, dtype=p.dtype, device=p.device)  # noqa: E731
        return {
            "S": {n: zeros(m.out_features) for n, m in self.modules.items()},
            "A": {n: zeros(m.in_features) for n, m in self.modules.items()},
            "a_count": 0.0,
        }

    def update(self, state: dict, batch: dict) -> dict:
        kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keeper(name):
            def hook(_module, args, output):
                kept[name] = (args[0].detach(), output)

            return hook

        handles = [m.register_forward_hook(keeper(n)) for n, m in self.modules.items()]
        try:
            output = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **logits_kwargs(batch, self.trim),
            )
        finally:
            for handle in handles:
                handle.remove()
        logits = self.output_fn(output, batch)
        vectors = fisher_vectors(logits.detach(), self.fisher, self.generator)
        names = list(kept)
        mask = batch["attention_mask"].to(logits.dtype)
        S, A = dict(state["S"]), dict(state["A"])
        for k, vector in enumerate(vectors):
            grads = torch.autograd.grad(
                logits, [kept[n][1] for n in names], vector, retain_graph=k < len(vectors) - 1
            )
            for name, grad in zip(names, grads, strict=True):
                rows = gradient_rows(grad, mask, self.sharing)
                S[name] = S[name] + rows.T @ rows
        for name in names:
            rows = input_rows(kept[name][0], mask, self.sharing)
            A[name] = A[name] + rows.T @ rows
        count = float(mask.sum()) if self.sharing == "expand" else mask.shape[0]
        return {"S": S, "A": A, "a_count": state["a_count"] + count}

    @staticmethod
    def factors(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (S, A)}`` dense, ``A`` divided by its row count."""
        return {n: (state["S"][n], state["A"][n] / state["a_count"]) for n in state["S"]}


# ------------------------------------------------------------------------------------------------
# bayesian-lora
# ------------------------------------------------------------------------------------------------


def bayesian_lora_factors(model, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """bayesian-lora's factors ``{module name: (A, S)}`` for one batch, called as its README does."""
    from bayesian_lora import calculate_kronecker_factors

    def fwd_call(model, batch):
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return output.logits[:, -1, list(common.ANSWER_IDS)]

    factors = calculate_kronecker_factors(
        model, fwd_call, [batch], LOWRANK["n_kfac"], LOWRANK["lr_threshold"], ["lora"]
    )
    model.eval()  # calculate_kronecker_factors leaves the model in training mode
    return factors


def bayesian_lora_dense(factors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (S, A)}`` as dense matrices; a low-rank factor ``B`` stands for ``B B^T``."""
    square = lambda f: f if f.shape[0] == f.shape[1] else f @ f.T  # noqa: E731
    return {name: (square(S), square(A)) for name, (A, S) in factors.items()}
