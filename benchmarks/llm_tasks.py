"""Readers of ARC-Easy, ARC-Challenge, OpenBookQA and BoolQ (read by path, never copied) and their `Scorer`, for
benchmarks/llm_quality.py and benchmarks/prior_study.py.

The data folder is ``../shared/data`` beside the repository, or ``$FLAPLACE_DATA_DIR``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path

import torch

import flaplace
from flaplace.scoring import ClozeModelFunction, cloze_batch

DATA = Path(os.environ.get("FLAPLACE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
Example = tuple[str, list[str], int]  # (prompt, choices, index of the right one)


# ------------------------------------------------------------------------------------------------


def _arc_prompt(stem: str) -> str:
    return f"Question: {stem.strip()}\nAnswer:"


def arc_easy(split: str, folder: str = "arc_easy", name: str = "ARC-Easy") -> list[Example]:
    """ARC-Easy (or the ARC set in ``folder`` whose jsonl files start with ``name``): train from the
    instruction-format ``train.json``; dev and test from the raw jsonl."""
    out: list[Example] = []
    if split == "train":
        for item in json.loads((DATA / folder / "train.json").read_text()):
            text = item["instruction"].split("Please choose the correct answer to the question: ", 1)[1]
            stem, rest = text.split("\n\nAnswer1: ", 1)
            listed = rest.split("\n\nAnswer format")[0]
            options = re.split(r" Answer\d: ", listed)
            label = int(item["answer"].replace("answer", "")) - 1
            if len(options) == 4 and 0 <= label < 4:
                out.append((_arc_prompt(stem), [o.strip() for o in options], label))
        return out
    part = {"validation": "Dev", "test": "Test"}[split]
    for line in (DATA / folder / f"{name}-{part}.jsonl").read_text().splitlines():
        item = json.loads(line)
        choices = item["question"]["choices"]
        labels = [c["label"] for c in choices]
        if len(choices) == 4 and item["answerKey"] in labels:
            out.append(
                (
                    _arc_prompt(item["question"]["stem"]),
                    [c["text"] for c in choices],
                    labels.index(item["answerKey"]),
                )
            )
    return out


def arc_challenge(split: str) -> list[Example]:
    """ARC-Challenge, read as ARC-Easy (the held-out task of the prior study: no recipe is chosen on it)."""
    return arc_easy(split, "arc_challenge", "ARC-Challenge")


def openbookqa(split: str) -> list[Example]:
    """OpenBookQA: the question stem is the prompt and each choice continues it."""
    name = {"train": "train", "validation": "dev", "test": "test"}[split]
    out: list[Example] = []
    with open(DATA / "openbookqa" / f"{name}.tsv", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            options = re.split(r"\s*\([A-D]\)\s*", row["Choices"])[1:]
            key = row["Answer Key"].strip()
            if len(options) == 4 and key in "ABCD":
                out.append((row["Question Stem"].strip(), [o.strip() for o in options], "ABCD".index(key)))
    return out


def boolq(split: str, seed: int = 0) -> list[Example]:
    """BoolQ with passages: ``val.jsonl`` (the only split with passages here), split by a fixed shuffle.

    The first 2,000 shuffled examples are the train pool, the next 500 validation, the rest test.
    Choices are ``yes`` (true) and ``no`` (false).
    """
    items = [json.loads(line) for line in (DATA / "boolq" / "val.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(items)
    part = {"train": items[:2000], "validation": items[2000:2500], "test": items[2500:]}[split]
    out: list[Example] = []
    for item in part:
        passage = item["passage"].split(" -- ", 1)[-1]
        prompt = f"{passage}\nQuestion: {item['question']}?\nAnswer:"
        out.append((prompt, ["yes", "no"], 0 if item["label"] in ("true", True) else 1))
    return out


TASKS = {"arc_easy": arc_easy, "arc_challenge": arc_challenge, "openbookqa": openbookqa, "boolq": boolq}


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


class Scorer:
    """Model function and batches of one task: cloze for multiple choice, answer tokens for BoolQ."""

    def __init__(self, model, tokenizer, params, task, max_length, normalize=False, unconditional=None):
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.unconditional = unconditional  # cloze: the context of each choice's baseline score
        if task == "boolq":
            ids = [tokenizer(" yes", add_special_tokens=False)["input_ids"][-1]]
            ids.append(tokenizer(" no", add_special_tokens=False)["input_ids"][-1])
            self.model_fn = flaplace.ModelFunction(model, params, flaplace.LastTokenLogits(ids))
        else:
            self.model_fn = ClozeModelFunction(model, params, normalize=normalize)

    def batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        prompts = [e[0] for e in examples]
        labels = [e[2] for e in examples]
        if self.task == "boolq":
            self.tokenizer.truncation_side = "left"  # keep the question, cut the passage's start
            enc = self.tokenizer(
                prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return {**enc, "labels": torch.tensor(labels)}
        return cloze_batch(
            self.tokenizer,
            prompts,
            [e[1] for e in examples],
            labels,
            max_length=self.max_length,
            unconditional=self.unconditional,
        )

    def batches(self, examples: list[Example], size: int) -> list[dict[str, torch.Tensor]]:
        return [self.batch(examples[i : i + size]) for i in range(0, len(examples), size)]
