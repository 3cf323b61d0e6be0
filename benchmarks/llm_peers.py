"""laplace-torch and bayesian-lora on SmolLM2's cloze / answer scores, for benchmarks/llm_quality.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import flaplace
from flaplace.params import logits_of as token_logits
from flaplace.scoring import cloze_scores, flatten_choices

if TYPE_CHECKING:
    from llm_tasks import Scorer


class PeerForward(torch.nn.Module):
    """``forward(batch) -> (B, C)`` scores with the model's own weights: what the peers call.

    Cloze batches are flattened to ``B*C`` rows with only the choice positions projected onto the
    vocabulary; BoolQ batches are read at the last position (" yes", " no"), as in `Scorer`.
    """

    def __init__(self, model, scorer: "Scorer"):
        super().__init__()
        self.model, self.scorer = model, scorer

    def model_kwargs(self, batch) -> dict[str, torch.Tensor]:
        if self.scorer.task == "boolq":
            return {k: v for k, v in batch.items() if k != "labels"}
        kwargs = flatten_choices(batch)
        kwargs["logits_to_keep"] = batch["choice_positions"].flatten(0, 1)
        return kwargs

    def scores(self, output, batch) -> torch.Tensor:
        if self.scorer.task == "boolq":
            return self.scorer.model_fn.output_fn(output, batch)
        return cloze_scores(token_logits(output), batch, normalize=self.scorer.model_fn.normalize)

    def forward(self, batch) -> torch.Tensor:
        return self.scores(self.model(**self.model_kwargs(batch)), batch)


class _Loader:
    """Pre-built batches with ``.dataset`` of the data size (what laplace-torch's ``fit`` reads)."""

    def __init__(self, batches, n: int):
        self.batches, self.dataset = batches, range(n)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def laplace_torch_probs(forward: PeerForward, train_batches, n_train: int, test_batches, samples: int):
    """laplace-torch: KronLaplace (exact GGN through curvlinops) over the LoRA weights, scalar prior by
    its marginal likelihood, GLM predictive with its Monte Carlo link."""
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN

    clock = time.perf_counter()
    la = KronLaplace(forward, "classification", backend=CurvlinopsGGN, prior_precision=1.0)
    la.fit(_Loader(train_batches, n_train))
    la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
    t_fit = time.perf_counter() - clock
    torch.manual_seed(0)
    probs = [la(b, pred_type="glm", link_approx="mc", n_samples=samples).detach() for b in test_batches]
    extra = {
        "lambda": float(la.prior_precision.reshape(-1)[0]),
        "log_evidence": float(la.log_marginal_likelihood().detach()),
        "n_params": int(la.n_params),
        "peer_times_s": {
            "fit_and_prior": round(t_fit, 1),
            "predictive": round(time.perf_counter() - clock - t_fit, 1),
        },
    }
    return torch.cat(probs), extra


def bayesian_lora_probs(
    forward: PeerForward, train_examples, scorer, test_batches, log_likelihood, rank, samples
):
    """bayesian-lora as its README runs it: K-FAC from its hooks (one example per batch, labels
    sampled from the model, the last token position of every row, low-rank factors of rank 10
    above side 100), prior variance by AdamW on its evidence, its Jacobians and variance, Monte
    Carlo link."""
    import bayesian_lora
    from bayesian_lora.main import jacobian_mean
    from transformers import BatchEncoding

    n_kfac, lr_threshold = 10, 100
    model = forward.model
    clock = time.perf_counter()
    single = [scorer.batch([e]) for e in train_examples]
    factors = bayesian_lora.calculate_kronecker_factors(
        model, lambda m, b: forward(b), single, n_kfac, lr_threshold, ["lora"]
    )
    factors = bayesian_lora.cholesky_decompose_small_factors(factors, lr_threshold, "cpu", torch.float32)
    model.eval()
    s2 = torch.tensor(0.1, requires_grad=True)
    optimizer = torch.optim.AdamW([s2], lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        loss = bayesian_lora.model_evidence(model, log_likelihood, factors, rank, n_kfac, s2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s2, 1.0)
        optimizer.step()
    s2 = s2.detach()
    note = None
    if not (torch.isfinite(s2) and s2 > 0):
        note = f"tuned prior variance {float(s2)} is not positive; used the initial 0.1"
        s2 = torch.tensor(0.1)
    t_fit = time.perf_counter() - clock
    generator = torch.Generator().manual_seed(0)
    probs = []
    for b in test_batches:
        kwargs = forward.model_kwargs(b)
        jac, f_mu = jacobian_mean(
            model, BatchEncoding(kwargs), output_callback=lambda out, b=b: forward.scores(out, b)
        )
        n_classes = f_mu.shape[-1]
        f_var = bayesian_lora.variance(
            BatchEncoding({"input_ids": b["input_ids"]}), jac, factors, s2, n_classes, rank, n_kfac, "cpu"
        )
        scale = bayesian_lora.stable_cholesky(f_var.double())
        noise = torch.randn((samples, *f_mu.shape, 1), generator=generator, dtype=torch.float64)
        logits = f_mu.detach().double()[..., None] + scale @ noise
        # its Jacobian stays differentiable with respect to the LoRA weights (they require grad),
        # so every batch's result holds that batch's whole forward graph: about 0.5 GB per pair
        # of questions here, which is what ran earlier runs out of memory. Detached, nothing is kept.
        probs.append(logits.squeeze(-1).softmax(-1).mean(0).detach())
    extra = {
        "prior_variance": float(s2),
        "lambda": 1.0 / float(s2),
        "note": note,
        "peer_times_s": {
            "fit_and_prior": round(t_fit, 1),
            "predictive": round(time.perf_counter() - clock - t_fit, 1),
        },
    }
    return torch.cat(probs).detach().float(), extra


#: flaplace's rows whose metrics a peer record repeats on the peer's own (first) test questions
OURS = ("flaplace", "flaplace-val", "flaplace-informed", "last_layer")


def ours_on_same_questions(probs_path, labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """flaplace's saved test probabilities, scored on the first ``len(labels)`` test questions only."""
    if not probs_path.exists():
        return {}
    saved = torch.load(probs_path)
    n = len(labels)
    if not torch.equal(saved["labels"][:n], labels):
        return {}
    return {
        m: flaplace.classification_metrics(saved["probs"][m][:n].float(), labels)
        for m in OURS
        if m in saved["probs"] and len(saved["probs"][m]) >= n
    }


def refresh(out, task: str, probs_path) -> str:
    """Recompute ``ours_on_same_examples`` of ``task``'s peer records in ``out`` from ``probs_path``
    (for peer rows written before flaplace's probabilities, or merged from another run's file)."""
    path = Path(out)
    records = json.loads(path.read_text())
    saved = torch.load(probs_path)
    done = []
    for r in records:
        if r["task"] == task and r["method"] in ("laplace-torch", "bayesian-lora"):
            r["ours_on_same_examples"] = ours_on_same_questions(probs_path, saved["labels"][: r["n_test"]])
            done.append(r["method"])
    path.write_text(json.dumps(records, indent=1) + "\n")
    return f"{task}: refreshed {', '.join(done) or 'no peer rows'}"


def peers_markdown(records: list[dict]) -> str:
    """NLL (accuracy) of every method on the peers' own test questions, one row per task."""
    columns = ("map", "temperature", *OURS, "laplace-torch", "bayesian-lora")
    lines = [
        "| task | n_test | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for task in sorted({r["task"] for r in records if r["method"] in ("laplace-torch", "bayesian-lora")}):
        peers = {r["method"]: r for r in records if r["task"] == task and "map_on_same_examples" in r}
        n = {r["n_test"] for r in peers.values()}
        if len(n) != 1:  # the peers saw different questions: no common row
            continue
        any_peer = next(iter(peers.values()))
        cells = {
            "map": any_peer["map_on_same_examples"],
            "temperature": any_peer["temperature_on_same_examples"],
            **any_peer.get("ours_on_same_examples", {}),
            **peers,
        }
        row = [f"{cells[c]['nll']:.3f} ({cells[c]['accuracy']:.2f})" if c in cells else "" for c in columns]
        lines.append(f"| {task} | {n.pop()} | " + " | ".join(row) + " |")
    return "\n".join(lines)
