"""Tiny random Hugging Face models and tokenizers saved to a folder, and tiny task files (all offline)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REVIEW_WORDS = {
    1: ["great", "good", "lovely", "fine", "superb"],
    0: ["bad", "awful", "poor", "dull", "broken"],
}
NOUNS = ["film", "meal", "phone", "hotel", "book", "song"]


def review(i: int, label: int) -> str:
    word = REVIEW_WORDS[label][i % 5]
    return f"the {NOUNS[i % len(NOUNS)]} was {word} ."


def write_demo_files(
    folder: Path, n: tuple[int, int, int] = (24, 8, 8), bad_label_at: int | None = None
) -> Path:
    """``demo_{train,validation,test}.jsonl`` in the bundled demo task's format."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "validation", "test"), n, strict=True):
        lines = []
        for i in range(count):
            label = (i * 7 + len(split)) % 2
            if bad_label_at is not None and split == "train" and i == bad_label_at:
                label = 7
            lines.append(json.dumps({"text": review(i, label % 2), "label": label}))
        (folder / f"demo_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_arc_files(folder: Path, n: tuple[int, int, int] = (16, 8, 8)) -> Path:
    """ARC-Easy files: ``train.json`` (instruction format), ``ARC-Easy-Dev.jsonl``, ``ARC-Easy-Test.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)

    def item(i: int) -> tuple[str, list[str], int]:
        options = [NOUNS[(i + k) % len(NOUNS)] for k in range(4)]
        return f"which {NOUNS[i % len(NOUNS)]} is {REVIEW_WORDS[1][i % 5]} ?", options, i % 4

    train = []
    for i in range(n[0]):
        stem, options, label = item(i)
        listed = " ".join(f"Answer{k + 1}: {o}" for k, o in enumerate(options))
        train.append(
            {
                "instruction": f"Please choose the correct answer to the question: {stem}\n\n{listed}\n\n"
                "Answer format: answer1/answer2/answer3/answer4",
                "answer": f"answer{label + 1}",
            }
        )
    (folder / "train.json").write_text(json.dumps(train))
    for name, count, offset in (("Dev", n[1], 100), ("Test", n[2], 200)):
        lines = []
        for i in range(offset, offset + count):
            stem, options, label = item(i)
            choices = [{"text": o, "label": letter} for o, letter in zip(options, "ABCD", strict=True)]
            lines.append(
                json.dumps({"question": {"stem": stem, "choices": choices}, "answerKey": "ABCD"[label]})
            )
        (folder / f"ARC-Easy-{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


def vocabulary() -> list[str]:
    words = set(NOUNS) | {w for ws in REVIEW_WORDS.values() for w in ws}
    words |= set(
        [
            "the",
            "was",
            ".",
            "?",
            "which",
            "is",
            "select",
            "one",
            "of",
            "choices",
            "that",
            "answers",
            "following",
            "question",
            ":",
            "answer",
        ]
    )
    words |= {"Select", "Choices", "Answer", "A", "B", "C", "D", "negative", "positive", "the", "ones"}
    return SPECIALS + sorted(words)


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny data's words; ``" A"`` is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[EOS]",
    )  # fmt: skip


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``llama``/``gpt2``/``phi`` causal LM or ``bert`` classifier with its tokenizer."""
    from tiny_models import tiny_base_model

    if arch not in ("llama", "phi", "gpt2", "bert"):
        raise ValueError(arch)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    # BERT keeps transformers' default dropout: MAP training in these tests runs with it.
    dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1} if arch == "bert" else {}
    model = tiny_base_model(arch, vocab=len(tokenizer), num_labels=2, pad_token_id=0, **dropout)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


#: LoRA targets of each tiny architecture.
TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
}
