"""Hugging Face datasets as the text tasks' data: a folder written by save_to_disk, and a
builder read through load_dataset, both made here (nothing is downloaded)."""

from __future__ import annotations

import csv

import pytest

from qkvsearch.models.errors import QkvError
from qkvsearch.tasks import TextClassification, TextCorpus
from qkvsearch.tasks.corpus import SEPARATOR

datasets = pytest.importorskip("datasets")
DOCS = [f"document {i}: " + "some words here. " * (i % 5 + 3) for i in range(60)]


def test_a_saved_dataset_is_a_corpus_split_by_row_and_cached(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": DOCS, "other": list(range(60))}).save_to_disk(str(folder))
    task = TextCorpus(dataset={"path": str(folder)}, text_field="body", seq_len=16, val_fraction=0.2,
                      test_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    task.setup("fit")
    sizes = {split: len(tokens) for split, tokens in task.tokens.items()}
    assert sum(sizes.values()) == sum(len((d + SEPARATOR).encode()) for d in DOCS)  # every row once, as bytes
    assert all(sizes[split] > 0 for split in ("train", "val", "test"))
    again = TextCorpus(dataset={"path": str(folder)}, text_field="body", seq_len=16, val_fraction=0.2,
                       test_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    again.setup("fit")
    assert again.folder == task.folder and len(list((tmp_path / "cache").iterdir())) == 1  # the same tokens, reused


def test_a_builder_through_load_dataset_and_class_labels_give_a_classifier(tmp_path):
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "mood"])
        writer.writerows([(f"{'good' if i % 2 else 'bad'} day {i}", "pos" if i % 2 else "neg") for i in range(40)])
    task = TextClassification(dataset={"name": "csv", "data_files": str(path)}, text="review", label="mood", seq_len=16)
    task.setup("fit")
    assert task.label_names == ["neg", "pos"] and sum(len(s["labels"]) for s in task.splits.values()) == 40
    labelled = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c", "d"] * 5, "label": [0, 1, 0, 1] * 5},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])}))
    labelled.save_to_disk(str(tmp_path / "classes"))
    named = TextClassification(dataset={"path": str(tmp_path / "classes")}, seq_len=4)
    named.setup("fit")
    assert named.label_names == ["no", "yes"]  # the ClassLabel's names, not its ids


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: TextCorpus(dataset={"path": str(p), "splt": "train"}), r"task.data.dataset.splt: unknown key; valid keys"),
    (lambda p: TextCorpus(dataset={"path": str(p), "name": "x"}), r"give a name .* or a path .*, not both"),
    (lambda p: TextCorpus(dataset={"path": str(p)}, text_field="txt"), r"task.data.text_field: the dataset has no column 'txt'; columns: body"),
    (lambda p: TextCorpus(paths=["x.txt"], dataset={"path": str(p)}), r"task.data: give paths or a dataset, not both"),
    (lambda p: TextClassification(dataset={"path": str(p)}, text="body", label="mood"), r"task.data.label: the dataset has no column 'mood'"),
    (lambda p: TextClassification(), r"task.data: give a path .* or a Hugging Face dataset"),
])
def test_bad_dataset_settings_are_named(tmp_path, make, message):
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(QkvError, match=message):
        task = make(tmp_path / "d")
        task.cache_dir = tmp_path / "cache"
        task.setup("fit")
