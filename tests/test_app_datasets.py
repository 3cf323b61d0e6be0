"""Hugging Face ``datasets`` as data, with the real library: ``Dataset``, ``DatasetDict`` and ``save_to_disk`` folders.

References: every kind of input must give the same examples as the same rows written to a JSONL
file (the format read before); the CLI must select the user task for a ``save_to_disk`` folder;
the Trainer helper must give, from a tokenised ``Dataset``, the posterior it gives from a
``DataLoader`` of the same rows padded by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import peft
import pytest
import torch
from test_app_trainer import ANSWER_IDS, arguments, causal_examples, collate, tiny_causal_lora
from test_app_user_task import small_args
from tiny_hf import review, save_tiny_model
from transformers import Trainer

from flaplace.app import cli
from flaplace.app.hfdatasets import PaddingCollator, dataset_splits
from flaplace.app.tasks import UserSpec, load_task
from flaplace.app.trainer import fit_laplace, laplace_from_trainer
from flaplace.app.userdata import UserDataError, load_user_data

SPEC = UserSpec(text="review", label="sentiment")
SPLIT_NAMES = ("train", "validation", "test")


def review_rows(n: int, start: int = 0) -> dict[str, list]:
    labels = [(i * 7) % 2 for i in range(start, start + n)]
    return {
        "review": [review(i, y) for i, y in zip(range(start, start + n), labels, strict=True)],
        "sentiment": labels,
    }


def reviews(n: int, start: int = 0, *, class_label: bool = True) -> datasets.Dataset:
    data = datasets.Dataset.from_dict(review_rows(n, start))
    if class_label:
        data = data.cast_column("sentiment", datasets.ClassLabel(names=["negative", "positive"]))
    return data


def write_jsonl(path: Path, rows: dict[str, list]) -> Path:
    records = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_dataset_reads_like_the_same_rows_in_a_jsonl_file(tmp_path):
    data = reviews(30, class_label=False)
    from_file = load_task("user", write_jsonl(tmp_path / "r.jsonl", review_rows(30)), user=SPEC, seed=3)
    from_dataset = load_task("user", data, user=SPEC, seed=3)
    assert from_dataset.splits == from_file.splits
    assert from_dataset.choices == ("0", "1") and from_dataset.source == "datasets.Dataset"
    # a ClassLabel feature names the classes; the examples are otherwise the same
    named = load_task("user", reviews(30), user=SPEC, seed=3)
    assert named.choices == ("negative", "positive")
    assert [e.label for e in named.split("train")] == [e.label for e in from_file.split("train")]


def test_a_dataset_dict_gives_its_splits_under_their_usual_names(tmp_path):
    train, dev, test = reviews(20), reviews(6, 100), reviews(5, 200)
    task = load_task("user", datasets.DatasetDict(training=train, dev=dev, test=test), user=SPEC)
    assert [len(task.split(s)) for s in SPLIT_NAMES] == [20, 6, 5]  # nothing carved
    expected = load_user_data(
        write_jsonl(tmp_path / "dev.jsonl", review_rows(6, 100)), text="review", label="sentiment"
    )
    assert [e.text for e in task.split("validation")] == [e.text for e in expected.examples]
    # a missing test split is carved from train, as for a file
    carved = load_task("user", datasets.DatasetDict(train=train, validation=dev), user=SPEC)
    assert [len(carved.split(s)) for s in SPLIT_NAMES] == [18, 6, 2]
    # an explicit file wins over the split
    spec = SPEC._replace(test_path=str(write_jsonl(tmp_path / "t.jsonl", review_rows(3, 300))))
    assert len(load_task("user", datasets.DatasetDict(train=train, test=test), user=spec).split("test")) == 3
    with pytest.raises(ValueError, match=r"splits \['unsupervised'\] but no training split"):
        load_task("user", datasets.DatasetDict(unsupervised=train), user=SPEC)
    assert sorted(dataset_splits({"Train": 1, "eval": 2, "testing": 3})) == ["test", "train", "validation"]


def test_save_to_disk_folders_of_a_dataset_and_of_a_dataset_dict(tmp_path):
    single, both = tmp_path / "single", tmp_path / "both"
    reviews(30).save_to_disk(str(single))
    datasets.DatasetDict(train=reviews(20), validation=reviews(6, 100)).save_to_disk(str(both))
    in_memory = load_task("user", reviews(30), user=SPEC)
    from_folder = load_task("user", single, user=SPEC)
    assert from_folder.splits == in_memory.splits and from_folder.source == str(single)
    assert [len(load_task("user", str(both), user=SPEC).split(s)) for s in SPLIT_NAMES] == [18, 6, 2]
    # load_user_data reads one split: a DatasetDict folder is refused naming its splits
    with pytest.raises(UserDataError, match=r"is a DatasetDict with the splits \['train', 'validation'\]"):
        load_user_data(both, text="review", label="sentiment")
    assert load_user_data(single, text="review", label="sentiment").classes == ("negative", "positive")


def test_datasets_errors_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder but not one written by datasets' save_to_disk"):
        load_task("user", tmp_path, user=SPEC)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("user", tmp_path / "saved", user=SPEC)
    with pytest.raises(TypeError, match="a datasets.Dataset or a datasets.DatasetDict; got list"):
        load_task("user", [{"review": "a"}], user=SPEC)
    with pytest.raises(UserDataError, match=r"the dataset, row 0: no column 'text' .* review, sentiment"):
        load_task("user", reviews(10), user=UserSpec())
    bad = datasets.DatasetDict(
        train=reviews(10), validation=datasets.Dataset.from_dict({"review": ["x"], "sentiment": [5]})
    )
    with pytest.raises(
        UserDataError, match=r"the DatasetDict, split 'validation', row 0: label 5 is not one of"
    ):
        load_task("user", bad, user=SPEC)


def test_cli_reads_a_save_to_disk_folder_as_the_user_task(tmp_path, capsys):
    model = save_tiny_model("gpt2", tmp_path / "gpt2")
    folder = tmp_path / "saved"
    datasets.DatasetDict(train=reviews(24), validation=reviews(4, 100), test=reviews(4, 200)).save_to_disk(
        str(folder)
    )
    argv = [*small_args(model, tmp_path / "out"), "--data-path", str(folder)]
    argv += ["--text-column", "review", "--label-column", "sentiment"]
    args = cli.build_parser().parse_args(argv)
    assert cli.config_from_args(args).task == "user"  # no --task: the folder selects the user task
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"]["choices"] == ["negative", "positive"]
    assert results["task"]["n_examples"] == {"train": 24, "validation": 4, "test": 4}
    # a folder that is neither a task's nor a dataset's: one line naming the cause, exit 2
    assert (
        cli.main(
            [
                *small_args(model, tmp_path / "out2"),
                "--data-path",
                str(tmp_path / "out"),
                "--text-column",
                "r",
            ]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "not one written by datasets' save_to_disk" in errors[0]


def tokenised(examples: list[dict[str, list[int]]]) -> datasets.Dataset:
    """The examples as a tokenised Dataset, with a raw text column the batches must leave out."""
    columns = {key: [e[key] for e in examples] for key in examples[0]}
    return datasets.Dataset.from_dict({**columns, "text": ["raw"] * len(examples)})


def test_padding_collator_pads_like_the_trainer_tests_collator():
    examples = causal_examples(5)
    ours = PaddingCollator(0)([{**e, "text": "raw"} for e in examples])
    expected = collate(examples)
    assert ours.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key])


def test_fit_laplace_takes_a_tokenised_dataset_and_a_dataset_dict():
    model = tiny_causal_lora().eval()
    examples = causal_examples(12)
    loader = torch.utils.data.DataLoader(examples, batch_size=8, collate_fn=collate)
    expected = fit_laplace(model, loader, answer_ids=ANSWER_IDS, fisher="exact")
    from_dataset = fit_laplace(model, tokenised(examples), answer_ids=ANSWER_IDS, fisher="exact")
    assert from_dataset.temperature == expected.temperature  # the default climbs T on both alike
    batch = collate(examples[:4])
    torch.testing.assert_close(from_dataset(batch), expected(batch))
    assert float(from_dataset.log_likelihood) == pytest.approx(float(expected.log_likelihood), rel=1e-6)
    # a DatasetDict: its train split, and its validation split for the validation-tuned prior
    splits = datasets.DatasetDict(train=tokenised(examples), validation=tokenised(causal_examples(4, seed=1)))
    tuned = fit_laplace(
        model, splits, answer_ids=ANSWER_IDS, fisher="exact", prior="val_nll", prior_options={"steps": 3}
    )
    at_one = fit_laplace(model, loader, answer_ids=ANSWER_IDS, fisher="exact", prior="evidence")
    assert float(tuned.log_likelihood) == pytest.approx(float(at_one.log_likelihood), rel=1e-6)
    with pytest.raises(ValueError, match="no input_ids: tokenise it first"):
        fit_laplace(model, reviews(4), answer_ids=ANSWER_IDS)


def test_laplace_from_trainer_with_a_dataset_as_train_dataset(tmp_path):
    model = tiny_causal_lora()
    examples = causal_examples(8)
    trainer = Trainer(
        model=model, args=arguments(tmp_path), train_dataset=tokenised(examples), data_collator=collate
    )
    trainer.train()
    la = laplace_from_trainer(trainer, answer_ids=ANSWER_IDS, fisher="exact")
    direct = fit_laplace(model, tokenised(examples), answer_ids=ANSWER_IDS, fisher="exact")
    assert float(la.log_likelihood) == pytest.approx(float(direct.log_likelihood), rel=1e-5)
    batch = collate(examples[:4])
    torch.testing.assert_close(la(batch), direct(batch), rtol=1e-4, atol=1e-5)


def test_token_type_ids_go_only_to_models_that_take_them():
    from tiny_models import tiny_base_model

    from flaplace.app.hfdatasets import dataset_loaders

    rows = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6], [7]], "token_type_ids": [[0, 0], [0]], "label": [1, 0]}
    )
    torch.manual_seed(0)
    for arch, expected in (
        ("llama", {"input_ids", "attention_mask", "labels"}),
        ("bert", {"input_ids", "attention_mask", "labels", "token_type_ids"}),
    ):
        model = peft.get_peft_model(
            tiny_base_model(arch),
            peft.LoraConfig(
                r=2, target_modules=["q_proj", "v_proj"] if arch == "llama" else ["query", "value"]
            ),
        )
        train, val = dataset_loaders(rows, None, model)
        assert set(next(iter(train))) == expected and val is None
