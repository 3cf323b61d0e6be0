"""Prompts: the text a causal LM reads for multiple-choice and true/false items.

Answers are written without a leading space; prepend one before tokenising for a causal
LM (``" A"``, ``" True"`` are single tokens in common vocabularies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flaplace.app.tasks.examples import TaskKind

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Select one of the choices that answers the following question:"
TRUE_FALSE_INSTRUCTION = "Answer the question with only True or False:"


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """The Laplace-LoRA multiple-choice prompt; the answers are the option letters.

    Examples:
        >>> multiple_choice_prompt("2 + 2 = ?", ["3", "4"])
        'Select one of the choices that answers the following question: 2 + 2 = ? Choices: A. 3 B. 4 Answer:'
    """
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2..{len(LETTERS)} options, got {len(options)}")
    listed = " ".join(f"{letter}. {clean_text(text)}" for letter, text in zip(LETTERS, options, strict=False))
    return f"{MC_INSTRUCTION} {clean_text(question)} Choices: {listed} Answer:"


def true_false_prompt(question: str, passage: str | None = None) -> str:
    """The BoolQ-style prompt; the answers are ``"False"`` and ``"True"``.

    Examples:
        >>> true_false_prompt("is the sky blue", "The sky is blue")
        'Answer the question with only True or False: is the sky blue? Context: The sky is blue. Answer:'
    """
    question = clean_text(question)
    if not question.endswith("?"):
        question += "?"
    if passage is None:
        return f"{TRUE_FALSE_INSTRUCTION} {question} Answer:"
    passage = clean_text(passage)
    if not passage.endswith((".", "!", "?")):
        passage += "."
    return f"{TRUE_FALSE_INSTRUCTION} {question} Context: {passage} Answer:"


def format_prompt(fields: Mapping[str, Any], kind: TaskKind) -> str:
    """Format the prompt of one item from its fields.

    ``multiple_choice`` needs ``question`` and ``options``; ``binary`` needs
    ``question`` and optionally ``passage``; ``classification`` returns
    ``text`` unchanged.

    Examples:
        >>> format_prompt({"question": "is ice cold", "passage": None}, "binary")
        'Answer the question with only True or False: is ice cold? Answer:'
        >>> format_prompt({"text": "a fine film"}, "classification")
        'a fine film'
    """
    required = {
        "multiple_choice": ("question", "options"),
        "binary": ("question",),
        "classification": ("text",),
    }
    if kind not in required:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(required)}")
    missing = [key for key in required[kind] if key not in fields]
    if missing:
        raise KeyError(f"format_prompt({kind!r}) needs the fields {missing}; got {sorted(fields)}")
    if kind == "multiple_choice":
        return multiple_choice_prompt(fields["question"], fields["options"])
    if kind == "binary":
        return true_false_prompt(fields["question"], fields.get("passage"))
    return str(fields["text"])


def clean_text(text: str) -> str:
    """Collapse runs of whitespace and strip."""
    return " ".join(str(text).split())
