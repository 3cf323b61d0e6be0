"""The posterior of a generatively fine-tuned LLM adapter: SmolLM2-135M-Instruct, SFT on ARC-Easy answers.

The task in generative form: ``Question: <stem>\\nAnswer: <answer text><eos>``, the loss on the
answer's tokens (and the end-of-sequence token) only, the prompt masked with -100. LoRA (r=8,
q_proj and v_proj of the last ``--layers`` decoder blocks) is trained by AdamW on the summed token
loss of a train subset; the epoch with the lowest validation token NLL is kept (the MAP). Then,
on the same MAP weights:

* ``map``: the model's own token probabilities;
* ``temperature``: one temperature on the token logits, fitted on the validation tokens;
* ``laplace``: token-level K-FAC (``fisher="mc"``, every supervised token a position, see the
  K-FAC docs), prior precision by the evidence, the full-vocabulary linearised predictive by
  forward-mode sampling (`flaplace.text_predictive.token_predictive`) over the whole posterior;
* ``laplace-informed``: the same, drawing only along the directions the data inform;
* ``laplace-val``: the whole posterior with the prior precision of the lowest validation token NLL
  on a grid.

Reported on the test questions' gold completions: token NLL (pooled over tokens) and sequence NLL
(per question; for the posterior the joint predictive ``-log mean_s prod_t p_s``), with paired
bootstrap 95% intervals of the difference to the MAP (questions resampled). For telling right from
wrong, every choice of a test question is scored as a completion; the model's answer is the choice
with the highest sequence score (MAP/temperature: log-likelihood; posterior: joint log predictive),
and the AUROC of right against wrong is measured for its confidence (the softmax over the choices'
scores) and, for the posterior, for minus its sequence mutual information.

The frozen blocks below the adapted ones do not depend on the adapter: their output is computed
once per sequence and every later pass (training, K-FAC, predictive) runs only the adapted tail
(`Tail`), which is the same function of the adapter weights (checked on the first batch).

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/generative.py --smoke       # tiny random Llama, a few seconds
    PYTHONPATH=$PWD python benchmarks/generative.py               # SmolLM2 (MAP and factors cached)

Writes ``benchmarks/results/generative.json`` (``--smoke`` writes nothing unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

from _common import log, quiet, write_results  # noqa: E402
from llm_tasks import arc_easy  # noqa: E402  (the shared data folder's reader)

from flaplace.evidence import tune_prior_evidence  # noqa: E402
from flaplace.kfac import fit  # noqa: E402
from flaplace.params import ModelFunction, select_params  # noqa: E402
from flaplace.posterior import make_posterior  # noqa: E402
from flaplace.predictive import informed_directions  # noqa: E402
from flaplace.temperature import fit_temperature  # noqa: E402
from flaplace.text_predictive import (  # noqa: E402
    sequence_log_predictive,
    sequence_sum,
    supervised_tokens,
    token_log_probs,
    token_predictive,
)
from flaplace.tokens import SupervisedTokenLogits  # noqa: E402
from flaplace.vocabulary import sample_perturbations  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "generative.json"


# ------------------------------------------------------------------------------------------------
# Model: the adapted tail on cached hidden states of the frozen blocks
# ------------------------------------------------------------------------------------------------


class Tail(nn.Module):
    """The causal LM from its first adapted block on: ``prefix`` holds the frozen blocks' output."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids=None, attention_mask=None, prefix=None, logits_to_keep=0, use_cache=None):
        return self.lm(
            inputs_embeds=prefix,
            attention_mask=attention_mask,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        )

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()


def decoder(lm: nn.Module) -> nn.Module:
    """The ``LlamaModel``-like module holding ``layers`` and ``norm`` (under PEFT or not)."""
    for module in lm.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "norm"):
            return module
    raise ValueError("no decoder with .layers and .norm found")


def split_model(lm: nn.Module, n_tail: int):
    """Cut the decoder after its first ``n - n_tail`` blocks; returns ``prefix_fn(ids, mask)`` and the tail model."""
    inner = decoder(lm)
    layers = list(inner.layers)
    head_layers, tail_layers = layers[: len(layers) - n_tail], layers[len(layers) - n_tail :]
    norm = inner.norm

    @torch.no_grad()
    def prefix_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inner.layers, inner.norm = nn.ModuleList(head_layers), nn.Identity()
        try:
            return inner(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            inner.layers, inner.norm = nn.ModuleList(tail_layers), norm

    inner.layers = nn.ModuleList(tail_layers)
    return prefix_fn


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def encode(tok, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + " answer" + eos, and the prompt's length (the supervised part follows it)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + a)[-max_length:]
    return ids, max(1, len(ids) - len(a))


def make_batches(
    rows: list[tuple[list[int], int]], size: int, pad: int, prefix_fn
) -> tuple[list[dict], torch.Tensor]:
    """Right-padded batches (rows sorted by length) with token labels (-100 on prompt and padding) and the
    cached prefix states; and the original index of each row, in batch order."""
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    out = []
    for start in range(0, len(rows), size):
        chunk = [rows[r] for r in order[start : start + size]]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (seq, n_prompt) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            labels[r, n_prompt : len(seq)] = ids[r, n_prompt : len(seq)]
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix": prefix_fn(ids, mask)}
        )
    return out, torch.tensor(order)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def map_rows(f, params, batches) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per batch: the supervised rows' logits, their targets and their example index."""
    rows, targets, examples = [], [], []
    for b in batches:
        tokens = supervised_tokens(b)
        rows.append(f(params, b).float())
        targets.append(tokens.targets)
        examples.append(tokens.example)
    return rows, targets, examples


def per_sequence(values: list[torch.Tensor], examples: list[torch.Tensor], batches) -> torch.Tensor:
    """Sum per-token values of each batch by example; concatenated over batches (batch order)."""
    return torch.cat(
        [
            sequence_sum(v, e, b["input_ids"].shape[0])
            for v, e, b in zip(values, examples, batches, strict=True)
        ]
    )


def unsort(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-sequence values from batch order back to the original row order."""
    out = torch.empty_like(values)
    out[order] = values
    return out


def token_counts(examples: list[torch.Tensor], batches) -> torch.Tensor:
    ones = [torch.ones(e.shape[0]) for e in examples]
    return per_sequence(ones, examples, batches)


def posterior_scores(f, posterior, batches, deltas) -> dict[str, torch.Tensor]:
    """Per sequence: summed token log predictive, joint log predictive, summed MI; per token list too."""
    token_lp, joint, mi, token_mi = [], [], [], []
    for i, b in enumerate(batches):
        pred = token_predictive(f, posterior, b, perturbations=deltas, chunk_size=deltas_chunk(deltas))
        n = b["input_ids"].shape[0]
        token_lp.append(sequence_sum(pred.log_predictive, pred.example, n))
        joint.append(sequence_log_predictive(pred.sample_log_probs, pred.example, n))
        mi.append(sequence_sum(pred.mutual_information, pred.example, n))
        token_mi.append(pred.mutual_information)
        if i % 10 == 0:
            log(f"  posterior batch {i}/{len(batches)}")
    return {
        "tokenwise": torch.cat(token_lp),
        "joint": torch.cat(joint),
        "mi": torch.cat(mi),
        "token_mi": torch.cat(token_mi),
    }


def deltas_chunk(deltas) -> int:
    return min(8, next(iter(deltas.values())).shape[0])


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def paired_interval(stat, a: np.ndarray, b: np.ndarray, counts: np.ndarray, n: int = 2000, seed: int = 0):
    """95% percentile interval of ``stat(a) - stat(b)`` over questions resampled with replacement (paired)."""
    from scipy.stats import bootstrap

    index = np.arange(len(a))

    def diff(rows: np.ndarray) -> float:
        return stat(a[rows], counts[rows]) - stat(b[rows], counts[rows])

    result = bootstrap(
        (index,), diff, vectorized=False, n_resamples=n, method="percentile", rng=np.random.default_rng(seed)
    )
    return diff(index), float(result.confidence_interval.low), float(result.confidence_interval.high)


def token_nll(seq_nll: np.ndarray, counts: np.ndarray) -> float:
    return float(seq_nll.sum() / counts.sum())


def seq_nll(values: np.ndarray, counts: np.ndarray) -> float:
    return float(values.mean())


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def load(args):
    import peft

    if args.smoke:
        from tiny_hf import tiny_tokenizer
        from tiny_models import tiny_base_model

        tok = tiny_tokenizer()
        torch.manual_seed(args.seed)
        lm = tiny_base_model("llama", vocab=len(tok))
    else:
        from flaplace.app.models import load_causal_lm

        lm, tok = load_causal_lm(args.model)
    for p in lm.parameters():
        p.requires_grad_(False)
    n = decoder(lm).layers.__len__()
    layers = list(range(n - args.layers, n))
    config = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        layers_to_transform=layers,
    )
    lm = peft.get_peft_model(lm, config).eval()
    return lm, tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama and a few examples")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n-train", type=int, default=192)
    parser.add_argument("--n-val", type=int, default=80)
    parser.add_argument("--n-test", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--lrs", default="3e-4,1e-3,3e-3", help="learning rates tried; the best on validation is kept"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--layers", type=int, default=2, help="adapt the last this many decoder blocks")
    parser.add_argument("--samples", type=int, default=8, help="posterior samples S")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument(
        "--prior-grid", default="0.1,1,10", help="validation grid: multiples of the evidence prior"
    )
    parser.add_argument("--methods", default="laplace,laplace-informed,laplace-val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="/tmp/flaplace-generative")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_val, args.n_test, args.epochs = (
            min(args.n_train, 16),
            min(args.n_val, 8),
            min(args.n_test, 8),
            1,
        )
        args.batch_size, args.samples, args.layers = 4, min(args.samples, 4), 1
        args.cache_dir = None
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS)
    quiet()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = time.perf_counter()
    times: dict[str, float] = {}

    lm, tok = load(args)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rng = random.Random(args.seed)
    splits = {}
    for split, n in (("train", args.n_train), ("validation", args.n_val), ("test", args.n_test)):
        examples = arc_easy(split)
        rng.shuffle(examples)
        splits[split] = examples[:n]
    log("arc_easy: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    # a full-model reference on one batch, before the model is cut
    check_rows = [encode(tok, p, c[y], args.max_length) for p, c, y in splits["validation"][:4]]
    check = make_batches(check_rows, 4, pad, lambda ids, mask: None)[0][0]
    with torch.no_grad():
        full = lm(
            input_ids=check["input_ids"], attention_mask=check["attention_mask"], labels=check["labels"]
        ).loss
    prefix_fn = split_model(lm, args.layers)
    tail = Tail(lm).eval()
    params0 = select_params(tail, "lora")
    f = ModelFunction(tail, params0, SupervisedTokenLogits())

    t = time.perf_counter()
    test_q = splits["test"]
    n_choices = len(test_q[0][1])
    key = f"n{args.n_train}-{args.n_val}-{args.n_test}_l{args.layers}_b{args.batch_size}_s{args.seed}"
    batches_file = Path(args.cache_dir) / f"batches_{key}.pt" if args.cache_dir else None
    if batches_file is not None and batches_file.exists():
        train, val, test, test_order = torch.load(batches_file)
    else:
        train_rows = [encode(tok, p, c[y], args.max_length) for p, c, y in splits["train"]]
        train, _ = make_batches(train_rows, args.batch_size, pad, prefix_fn)
        log("train prefix states done")
        val_rows = [encode(tok, p, c[y], args.max_length) for p, c, y in splits["validation"]]
        val, _ = make_batches(val_rows, args.batch_size, pad, prefix_fn)
        choice_rows = [encode(tok, p, c, args.max_length) for p, cs, _ in test_q for c in cs]
        test, test_order = make_batches(choice_rows, args.batch_size, pad, prefix_fn)
        if batches_file is not None:
            batches_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save((train, val, test, test_order), batches_file)
    times["prefix"] = time.perf_counter() - t
    log(
        f"prefix states: {times['prefix']:.0f} s; {len(train)} train, {len(val)} validation, {len(test)} test batches"
    )
    check["prefix"] = prefix_fn(check["input_ids"], check["attention_mask"])
    with torch.no_grad():
        rows = f(params0, check)
        tail_loss = torch.nn.functional.cross_entropy(rows.float(), supervised_tokens(check).targets)
    log(f"full model loss {float(full):.5f}, tail loss {float(tail_loss):.5f}")
    assert abs(float(full) - float(tail_loss)) < 1e-3 * max(1.0, float(full)), "the tail is not the model"

    # ---- MAP
    cache = None if args.cache_dir is None else Path(args.cache_dir)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    lrs = [float(x) for x in args.lrs.split(",")]
    map_file = cache / f"map_n{args.n_train}_l{args.layers}_lr{args.lrs}_e{args.epochs}.pt" if cache else None
    t = time.perf_counter()

    def val_nll(p) -> float:
        r, y, _ = map_rows(f, p, val)
        return float(-torch.cat([token_log_probs(a, b) for a, b in zip(r, y, strict=True)]).mean())

    def train_map(lr: float):
        """AdamW on the mean token loss; the epoch with the lowest validation token NLL (epoch 0: no training)."""
        live = {n: p.detach().clone().requires_grad_(True) for n, p in params0.items()}
        opt = torch.optim.AdamW(live.values(), lr=lr, weight_decay=0.0)
        total = args.epochs * len(train)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 3) * max(0.0, 1 - s / total)
        )
        history = [{"lr": lr, "epoch": 0, "val_token_nll": val_nll(params0)}]
        best = (history[0]["val_token_nll"], {n: p.detach().clone() for n, p in params0.items()}, 0)
        order = list(range(len(train)))
        for epoch in range(1, args.epochs + 1):
            random.Random(args.seed + epoch).shuffle(order)
            for step, i in enumerate(order):
                b = train[i]
                loss = torch.nn.functional.cross_entropy(f(live, b).float(), supervised_tokens(b).targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                if step % 8 == 0:
                    log(f"lr {lr:g} epoch {epoch} step {step}/{len(train)} loss {loss.item():.4f}")
            nll = val_nll({n: p.detach() for n, p in live.items()})
            history.append({"lr": lr, "epoch": epoch, "val_token_nll": nll})
            log(f"lr {lr:g} epoch {epoch} validation token NLL {nll:.4f}")
            if nll < best[0]:
                best = (nll, {n: p.detach().clone() for n, p in live.items()}, epoch)
        return best, history

    if map_file is not None and map_file.exists():
        map_params, best_epoch, best_lr, history = torch.load(map_file)
        log(f"MAP from {map_file}")
    else:
        history, best_overall = [], None
        for lr in lrs:
            best, hist = train_map(lr)
            history += hist
            if best_overall is None or best[0] < best_overall[0][0]:
                best_overall = (best, lr)
        assert best_overall is not None
        (_, map_params, best_epoch), best_lr = best_overall
        if map_file is not None:
            torch.save((map_params, best_epoch, best_lr, history), map_file)
    times["map"] = time.perf_counter() - t
    log(f"MAP: lr {best_lr:g}, epoch {best_epoch} ({times['map']:.0f} s)")

    # ---- K-FAC (token level) and the evidence prior
    kfac_file = map_file.with_name(map_file.stem + "_kfac.pt") if map_file else None
    t = time.perf_counter()
    if kfac_file is not None and kfac_file.exists():
        factors, log_likelihood = torch.load(kfac_file)
    else:
        factors, state = fit(
            f,
            map_params,
            train,
            fisher="mc",
            progress=False,
            generator=torch.Generator().manual_seed(args.seed),
        )
        log_likelihood = float(state.log_likelihood)
        if kfac_file is not None:
            torch.save((factors, log_likelihood), kfac_file)
    times["kfac"] = time.perf_counter() - t
    posterior, _ = tune_prior_evidence(
        make_posterior(factors, map_params, 1.0), log_likelihood, progress=False
    )
    lam = float(next(iter(posterior.prior_precision.values())))
    n_informed = sum(informed_directions(posterior).values())
    log(
        f"K-FAC {times['kfac']:.0f} s; log-likelihood {log_likelihood:.1f}; evidence prior {lam:.4g}; informed directions {n_informed}"
    )

    # ---- temperature on validation tokens
    val_r, val_y, val_e = map_rows(f, map_params, val)
    temperature = fit_temperature(val_r, val_y)
    val_counts = token_counts(val_e, val)
    log(f"temperature {temperature:.4f}")

    # ---- test: every choice of every question as a completion
    t = time.perf_counter()
    test_r, test_y, test_e = map_rows(f, map_params, test)
    counts = unsort(token_counts(test_e, test), test_order)
    map_lp = [token_log_probs(r, y) for r, y in zip(test_r, test_y, strict=True)]
    map_seq = unsort(per_sequence(map_lp, test_e, test), test_order)
    temp_lp = [token_log_probs(r, y, temperature) for r, y in zip(test_r, test_y, strict=True)]
    temp_seq = unsort(per_sequence(temp_lp, test_e, test), test_order)
    del test_r
    times["map_test"] = time.perf_counter() - t
    n_q = len(test_q)
    gold = torch.tensor([y for _, _, y in test_q])
    shape = (n_q, n_choices)
    gold_index = torch.arange(n_q) * n_choices + gold
    methods: dict[str, dict[str, Any]] = {
        "map": {"seq": map_seq, "choice_score": map_seq},
        "temperature": {"seq": temp_seq, "choice_score": temp_seq, "temperature": temperature},
    }

    wanted = [m for m in args.methods.split(",") if m]
    if "laplace-val" in wanted:  # the prior precision of the lowest validation token NLL, same draws
        t = time.perf_counter()
        grid = [lam * float(x) for x in args.prior_grid.split(",")]
        scores = []
        for value in grid:
            candidate = make_posterior(factors, map_params, value)
            deltas = sample_perturbations(
                candidate, args.samples, torch.Generator().manual_seed(args.seed + 1)
            )
            lp = posterior_scores(f, candidate, val, deltas)["tokenwise"]
            scores.append(float(-lp.sum() / val_counts.sum()))
            log(f"validation prior {value:.4g}: token NLL {scores[-1]:.4f}")
        val_lam = grid[int(np.argmin(scores))]
        times["prior_grid"] = time.perf_counter() - t
    for name in wanted:
        t = time.perf_counter()
        directions = "informed" if name == "laplace-informed" else "all"
        if directions == "informed" and n_informed == 0:  # no direction informed: the MAP exactly
            zero = torch.zeros_like(map_seq)
            methods[name] = {
                "seq": map_seq, "choice_score": map_seq, "tokenwise": map_seq, "mi": zero,
                "prior_precision": lam, "directions": directions, "mean_token_mi": 0.0,
            }  # fmt: skip
            log(f"{name}: no informed direction, the MAP's predictive")
            continue
        post = make_posterior(factors, map_params, val_lam) if name == "laplace-val" else posterior
        deltas = sample_perturbations(
            post, args.samples, torch.Generator().manual_seed(args.seed + 2), directions=directions
        )
        log(f"{name}: prior {float(next(iter(post.prior_precision.values()))):.4g}, directions {directions}")
        s = posterior_scores(f, post, test, deltas)
        s = {k: (v if k == "token_mi" else unsort(v, test_order)) for k, v in s.items()}
        methods[name] = {
            "seq": s["joint"], "choice_score": s["joint"], "tokenwise": s["tokenwise"], "mi": s["mi"],
            "prior_precision": float(next(iter(post.prior_precision.values()))), "directions": directions,
            "mean_token_mi": float(s["token_mi"].mean()),
        }  # fmt: skip
        times[name] = time.perf_counter() - t
        log(f"{name}: {times[name]:.0f} s")

    # ---- records
    gold_counts = counts[gold_index].numpy()
    map_gold_nll = -methods["map"]["seq"][gold_index].numpy()
    records = []
    for name, m in methods.items():
        nll = -m["seq"][gold_index].numpy()
        scores = m["choice_score"].view(shape)
        chosen = scores.argmax(1)
        right = (chosen == gold).numpy()
        confidence = torch.softmax(scores, 1).max(1).values.numpy()
        d_tok = paired_interval(token_nll, nll, map_gold_nll, gold_counts)
        d_seq = paired_interval(seq_nll, nll, map_gold_nll, gold_counts)
        rec: dict[str, Any] = {
            "method": name,
            "token_nll": token_nll(nll, gold_counts),
            "sequence_nll": seq_nll(nll, gold_counts),
            "token_nll_diff_vs_map": d_tok[0],
            "token_nll_diff_vs_map_lo": d_tok[1],
            "token_nll_diff_vs_map_hi": d_tok[2],
            "sequence_nll_diff_vs_map_lo": d_seq[1],
            "sequence_nll_diff_vs_map_hi": d_seq[2],
            "accuracy": float(right.mean()),
            "auroc_confidence": auroc(confidence, right),
        }
        if "mi" in m:
            mi_chosen = m["mi"].view(shape).gather(1, chosen[:, None])[:, 0].numpy()
            rec["auroc_mi"] = auroc(-mi_chosen, right)
            rec["auroc"] = rec["auroc_mi"]
            tokenwise = -m["tokenwise"][gold_index].numpy()
            rec["token_nll_tokenwise"] = token_nll(tokenwise, gold_counts)
            rec["sequence_nll_tokenwise"] = seq_nll(tokenwise, gold_counts)
            rec["auroc_score"] = "minus the chosen answer's sequence mutual information"
            for key in ("prior_precision", "directions", "mean_token_mi"):
                rec[key] = m[key]
        else:
            rec["auroc"] = rec["auroc_confidence"]
            rec["auroc_score"] = "the chosen answer's probability among the choices"
        if "temperature" in m:
            rec["temperature"] = m["temperature"]
        rec["n_test"] = n_q
        rec["n_test_tokens"] = int(gold_counts.sum())
        records.append(rec)
        log(
            f"{name:17s} token NLL {rec['token_nll']:.4f} [{d_tok[1]:+.4f}, {d_tok[2]:+.4f}] "
            f"seq NLL {rec['sequence_nll']:.4f} acc {rec['accuracy']:.3f} AUROC {rec['auroc']:.3f}"
        )
    times["total"] = time.perf_counter() - clock
    setup = {
        "model": "tiny-random-llama" if args.smoke else "SmolLM2-135M-Instruct",
        "task": "arc_easy (generative: Question/Answer text, loss on the answer tokens + eos)",
        "n_train": len(splits["train"]), "n_val": len(splits["validation"]),
        "lora": f"r={args.rank} on {args.targets} of the last {args.layers} blocks",
        "lr": best_lr, "lrs_tried": lrs, "epochs": args.epochs, "best_epoch": best_epoch, "history": history,
        "fisher": "mc", "evidence_prior": lam, "informed_directions": n_informed,
        "samples": args.samples, "seconds": times, "threads": args.threads,
    }  # fmt: skip
    if "laplace-val" in wanted:
        setup["validation_prior"] = val_lam
    for rec in records:
        rec["setup"] = setup
    if out is not None:
        write_results(out, records)
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
