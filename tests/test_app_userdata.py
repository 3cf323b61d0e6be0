"""A user's JSONL/CSV data by named columns (flaplace.app.userdata); files written to tmp_path."""

from __future__ import annotations

import json

import pytest

from flaplace.app.userdata import UserDataError, UserExample, load_user_data, read_rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_classification_jsonl_with_names_and_a_pair(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"premise": "a cat sat", "hypothesis": "an animal sat", "y": "entailment"},
            {"premise": "a cat sat", "hypothesis": "nobody sat", "y": "contradiction"},
        ],
    )
    data = load_user_data(path, text="premise", text_pair="hypothesis", label="y")
    assert data.kind == "classification"
    assert data.classes == ("contradiction", "entailment")
    assert data.examples == [
        UserExample("a cat sat", ("contradiction", "entailment"), 1, "an animal sat"),
        UserExample("a cat sat", ("contradiction", "entailment"), 0, "nobody sat"),
    ]


def test_classification_csv_with_integer_labels_and_given_classes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('review,stars\n"good, really",1\nbad,0\nfine,1\n')
    data = load_user_data(path, text="review", label="stars")
    assert data.classes == ("0", "1")
    assert [(e.text, e.label) for e in data.examples] == [("good, really", 1), ("bad", 0), ("fine", 1)]
    named = load_user_data(path, text="review", label="stars", classes=["negative", "positive"])
    assert named.classes == ("negative", "positive") and named.examples[0].label == 1


def test_multiple_choice_list_column_and_option_columns(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"q": "2+2?", "options": ["3", "4", "5"], "answer": "B"},
            {"q": "red?", "options": ["blue", "red", "green"], "answer": 2},
            {"q": "sky?", "options": ["blue", "red", "green"], "answer": "blue"},
        ],
    )
    data = load_user_data(jsonl, text="q", label="answer", choices="options")
    assert data.kind == "multiple_choice" and data.classes == ("A", "B", "C")
    assert [e.label for e in data.examples] == [1, 2, 0]
    assert data.examples[0].choices == ("3", "4", "5")
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("question,A,B,answer\nup?,down,up,B\n")
    mc = load_user_data(csv_path, text="question", label="answer", choices="A,B")
    assert mc.examples == [UserExample("up?", ("down", "up"), 1)]


def test_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "x", "label": 0}, {"sentence": "y", "label": 1}])
    with pytest.raises(
        UserDataError,
        match=r"d.jsonl:1: no column 'text' \(the text column\); the columns found are: sentence, label",
    ):
        load_user_data(path)
    with pytest.raises(UserDataError, match=r"no column 'hyp' \(the text_pair column\)"):
        load_user_data(path, text="sentence", text_pair="hyp")
    with pytest.raises(UserDataError, match=r"no column 'opts' \(the choices column\)"):
        load_user_data(path, text="sentence", choices="opts")


def test_bad_values_are_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    with pytest.raises(
        UserDataError, match=r"d.jsonl:1: label 'pos' is not one of the classes \['negative', 'positive'\]"
    ):
        load_user_data(path, classes=["negative", "positive"])
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(UserDataError, match="at least two"):
        load_user_data(one)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"text": "q", "c": ["a", "b"], "label": "E"}])
    with pytest.raises(UserDataError, match="neither an option's index"):
        load_user_data(mc, choices="c")
    uneven = write_jsonl(
        tmp_path / "u.jsonl",
        [{"text": "q", "c": ["a", "b"], "label": 0}, {"text": "q", "c": ["a", "b", "c"], "label": 0}],
    )
    with pytest.raises(UserDataError, match="same number of options"):
        load_user_data(uneven, choices="c")
    with pytest.raises(UserDataError, match="unknown format"):
        (tmp_path / "d.parquet").write_text("")
        read_rows(tmp_path / "d.parquet")
    with pytest.raises(UserDataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(UserDataError, match=r"bad.jsonl:1: invalid JSON"):
        read_rows(tmp_path / "bad.jsonl")
