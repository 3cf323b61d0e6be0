"""``flaplace run --data-path my.jsonl``: the user's own files as task ``user`` (tiny models, offline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tiny_hf import NOUNS, REVIEW_WORDS, TARGETS, review, save_tiny_model

from flaplace.app import cli
from flaplace.app.config import RunConfig, stage_key
from flaplace.app.tasks import Example, TaskDataError, UserSpec, load_task
from flaplace.app.tasks.prompts import multiple_choice_prompt
from flaplace.app.tasks.user import carve_splits


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("user") / "gpt2")


def write_reviews(path: Path, n: int, start: int = 0) -> Path:
    rows = [
        {"review": review(i, (i * 7) % 2), "sentiment": ("negative", "positive")[(i * 7) % 2], "id": i}
        for i in range(start, start + n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quiz_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    rows = []
    for i in range(start, start + n):
        options = [NOUNS[(i + k) % len(NOUNS)] for k in range(4)]
        rows.append(
            {"question": f"which {NOUNS[i % 6]} is {REVIEW_WORDS[1][i % 5]} ?"}
            | dict(zip("ABCD", options, strict=True))
            | {"answer": "ABCD"[i % 4]}
        )
    return rows


def write_quiz(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


def small_args(model: Path, out: Path) -> list[str]:
    return [
        "run",
        "--model", str(model),
        "--lora-rank", "2",
        "--lora-targets", ",".join(TARGETS["gpt2"]),
        "--steps", "4",
        "--batch-size", "4",
        "--max-length", "48",
        "--lr-threshold", "12",
        "--n-kfac", "4",
        "--output-dir", str(out),
        "--quiet",
    ]  # fmt: skip


def test_run_on_a_users_jsonl_classification_file(gpt2, tmp_path, capsys):
    data = write_reviews(tmp_path / "my.jsonl", 30)
    argv = [*small_args(gpt2, tmp_path / "out"), "--data-path", str(data)]
    argv += ["--text-column", "review", "--label-column", "sentiment"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "Laplace" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["task"] == "user"  # a file as --data-path selects the user task
    assert results["task"]["kind"] == "classification"
    assert results["task"]["choices"] == ["negative", "positive"]
    # no validation/test files: 10% of the 30 rows carved for each
    assert results["task"]["n_examples"] == {"train": 24, "validation": 3, "test": 3}
    assert results["task"]["source"] == str(data)
    assert 0 <= results["metrics"]["laplace"]["accuracy"] <= 1


def test_run_on_a_users_multiple_choice_csv_with_validation_and_test_files(gpt2, tmp_path, capsys):
    train = write_quiz(tmp_path / "quiz_train.csv", quiz_rows(12))
    validation = write_quiz(tmp_path / "quiz_val.csv", quiz_rows(5, start=100))
    test = write_quiz(tmp_path / "quiz_test.tsv", quiz_rows(6, start=200))
    argv = [*small_args(gpt2, tmp_path / "out"), "--task", "user", "--data-path", str(train)]
    argv += ["--validation-path", str(validation), "--test-path", str(test)]
    argv += ["--text-column", "question", "--label-column", "answer", "--choice-columns", "A,B,C,D"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"]["kind"] == "multiple_choice"
    assert results["task"]["choices"] == ["A", "B", "C", "D"]
    assert results["task"]["n_examples"] == {"train": 12, "validation": 5, "test": 6}
    assert results["config"]["choice_columns"] == ["A", "B", "C", "D"]


def test_a_missing_column_is_one_line_naming_it_and_the_columns_found(gpt2, tmp_path, capsys):
    data = write_reviews(tmp_path / "my.jsonl", 30)
    argv = [*small_args(gpt2, tmp_path / "out"), "--data-path", str(data), "--label-column", "stars"]
    argv += ["--text-column", "review"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'stars'" in err and "label" in err and "review, sentiment, id" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_user_task_examples_match_the_built_in_formats(tmp_path):
    rows = quiz_rows(20)
    task = load_task(
        "user",
        write_quiz(tmp_path / "quiz.tsv", rows),
        user=UserSpec(text="question", label="answer", choices=("A", "B", "C", "D")),
    )
    assert task.kind == "multiple_choice" and task.choices == ("A", "B", "C", "D")
    texts = {ex.text: ex.label for split in ("train", "validation", "test") for ex in task.split(split)}
    for row in rows:  # every row lands in exactly one split, as the multiple-choice prompt
        prompt = multiple_choice_prompt(row["question"], [row[c] for c in "ABCD"])
        assert texts[prompt] == "ABCD".index(row["answer"])
    assert sum(len(task.split(s)) for s in ("train", "validation", "test")) == len(rows) == len(texts)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"p": f"the {n} was fine .", "h": f"the {n} was bad .", "y": i % 2}) + "\n"
            for i, n in enumerate(NOUNS * 2)
        )
    )
    task = load_task(
        "user", pairs, user=UserSpec(text="p", text_pair="h", label="y"), max_examples={"train": 5}
    )
    assert task.kind == "classification" and task.choices == ("0", "1")
    assert len(task.split("train")) == 5
    assert all(ex.text_pair is not None and ex.text_pair.endswith("bad .") for ex in task.split("test"))


def test_carving_is_fixed_by_the_seed_and_covers_every_row_once():
    rows = [Example(str(i), ("a", "b"), i % 2) for i in range(37)]
    first = carve_splits(rows, ["validation", "test"], seed=3)
    assert first == carve_splits(rows, ["validation", "test"], seed=3)
    assert first != carve_splits(rows, ["validation", "test"], seed=4)
    assert [len(first[s]) for s in ("train", "validation", "test")] == [29, 4, 4]
    seen = [int(ex.text) for split in first.values() for ex in split]
    assert sorted(seen) == list(range(37))
    for split in first.values():  # file order is kept inside each split
        assert [int(ex.text) for ex in split] == sorted(int(ex.text) for ex in split)
    only_test = carve_splits(rows, ["test"], seed=3)
    assert sorted(only_test) == ["test", "train"] and len(only_test["train"]) == 33
    with pytest.raises(TaskDataError, match="too few"):
        carve_splits(rows[:2], ["validation", "test"], seed=0)


def test_files_that_disagree_and_missing_files_are_clear_errors(tmp_path):
    train = write_reviews(tmp_path / "train.jsonl", 20)
    odd = tmp_path / "val.jsonl"
    odd.write_text(json.dumps({"review": "the film was fine .", "sentiment": "neutral"}) + "\n")
    spec = UserSpec(text="review", label="sentiment", validation_path=str(odd))
    with pytest.raises(
        ValueError, match=r"label 'neutral' is not one of the classes \['negative', 'positive'\]"
    ):
        load_task("user", train, user=spec)
    three = write_quiz(
        tmp_path / "three.csv", [{k: v for k, v in r.items() if k != "D"} for r in quiz_rows(3)]
    )
    quiz = UserSpec(text="question", label="answer", choices=("A", "B", "C", "D"))
    with pytest.raises(ValueError, match="no column 'D'.*columns found are: question, A, B, C, answer"):
        load_task("user", three, user=quiz)
    lists = {}
    for n_options in (3, 4):  # one column holding the list of options, 3 in one file and 4 in the other
        lists[n_options] = tmp_path / f"lists{n_options}.jsonl"
        lists[n_options].write_text(
            "".join(
                json.dumps({"q": "which ?", "opts": NOUNS[:n_options], "a": i % 3}) + "\n" for i in range(20)
            )
        )
    spec = UserSpec(text="q", label="a", choices=("opts",), test_path=str(lists[4]))
    with pytest.raises(ValueError, match="4 options per question, but the training file .* has 3"):
        load_task("user", lists[3], user=spec)
    with pytest.raises(FileNotFoundError, match="give --data-path"):
        load_task("user")
    with pytest.raises(FileNotFoundError, match="is a folder but not one written by datasets' save_to_disk"):
        load_task("user", tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file; for your own data file use --task user"):
        load_task("sst2", train)


def test_user_options_are_part_of_the_map_key():
    base = RunConfig(model="m", task="user", data_path="my.jsonl")
    for change in ({"text_column": "review"}, {"choice_columns": ("A", "B")}, {"test_path": "t.jsonl"}):
        assert stage_key(RunConfig(**{**vars(base), **change}), "map") != stage_key(base, "map")


def test_user_options_with_another_task_are_an_error():
    with pytest.raises(ValueError, match="text_column is read only for your own data"):
        RunConfig(model="m", task="sst2", text_column="review")
    with pytest.raises(ValueError, match="choice_columns is read only"):
        RunConfig(model="m", choice_columns=("A", "B"))
