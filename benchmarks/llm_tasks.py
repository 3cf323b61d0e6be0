"""Readers of ARC-Easy, OpenBookQA and BoolQ for benchmarks/llm_quality.py (read by path, never copied).

The data folder is ``../shared/data`` beside the repository, or ``$FLAPLACE_DATA_DIR``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path

DATA = Path(os.environ.get("FLAPLACE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
Example = tuple[str, list[str], int]  # (prompt, choices, index of the right one)


# ------------------------------------------------------------------------------------------------


def _arc_prompt(stem: str) -> str:
    return f"Question: {stem.strip()}\nAnswer:"


def arc_easy(split: str) -> list[Example]:
    """ARC-Easy: train from the instruction-format ``train.json``; dev and test from the raw jsonl."""
    out: list[Example] = []
    if split == "train":
        for item in json.loads((DATA / "arc_easy" / "train.json").read_text()):
            text = item["instruction"].split("Please choose the correct answer to the question: ", 1)[1]
            stem, rest = text.split("\n\nAnswer1: ", 1)
            listed = rest.split("\n\nAnswer format")[0]
            options = re.split(r" Answer\d: ", listed)
            label = int(item["answer"].replace("answer", "")) - 1
            if len(options) == 4 and 0 <= label < 4:
                out.append((_arc_prompt(stem), [o.strip() for o in options], label))
        return out
    name = {"validation": "Dev", "test": "Test"}[split]
    for line in (DATA / "arc_easy" / f"ARC-Easy-{name}.jsonl").read_text().splitlines():
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


TASKS = {"arc_easy": arc_easy, "openbookqa": openbookqa, "boolq": boolq}
