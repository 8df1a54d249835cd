"""task=text_classification: the user's CSV/JSONL rows, classified by one of their columns."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
import torch

from qkvsearch.models.errors import QkvError
from qkvsearch.search.inspect.selection import architecture
from qkvsearch.tasks import TextClassification
from tests.conftest import compose_conf

MOODS = {"pos": "a good and lovely day", "neg": "a bad and awful day", "meh": "a plain and ordinary day"}


def write_rows(path, per_label=30):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "review", "sentiment"])
        for i in range(per_label):
            for label, text in MOODS.items():
                writer.writerow([f"{label}{i}", f"{text} number {i} " + "x" * (i % 7), label])
    return path


def test_rows_become_padded_tokens_with_label_ids_and_a_stratified_split(tmp_path):
    task = TextClassification(path=str(write_rows(tmp_path / "reviews.csv")), text="review", label="sentiment",
                              seq_len=24, val_fraction=0.2, test_fraction=0.1)
    task.setup("fit")
    assert task.label_names == ["meh", "neg", "pos"] and task.n_classes == 3 and task.vocab_size == 256
    for split, per_label in (("train", 21), ("val", 6), ("test", 3)):  # every label in the same proportions
        counts = torch.bincount(task.splits[split]["labels"], minlength=3).tolist()
        assert counts == [per_label] * 3, (split, counts)
    batch = next(iter(task.val_dataloader()))
    assert batch["tokens"].shape[1] == 24
    real = batch["padding_mask"].sum(1)
    assert (real <= 24).all() and (batch["tokens"][~batch["padding_mask"]] == 0).all()
    first = task.tokenizer.decode(batch["tokens"][0, : int(real[0])].tolist())
    assert len(first) == int(real[0]) and any(first.startswith(text) for text in MOODS.values())  # the row's text


def test_parquet_rows_split_as_the_same_csv_rows_do(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    csv_path = write_rows(tmp_path / "reviews.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in ("id", "review", "sentiment")}), tmp_path / "reviews.parquet")
    tasks = [TextClassification(path=str(tmp_path / name), text="review", label="sentiment", seq_len=24)
             for name in ("reviews.csv", "reviews.parquet")]
    for task in tasks:
        task.setup("fit")
    assert tasks[0].label_names == tasks[1].label_names == ["meh", "neg", "pos"]
    for split in ("train", "val", "test"):
        for key in ("tokens", "labels"):
            assert torch.equal(tasks[0].splits[split][key], tasks[1].splits[split][key])
    with pytest.raises(QkvError, match=r"task.data.label: .*reviews.parquet has no column 'label' \(its columns: id, review, sentiment\)"):
        TextClassification(path=str(tmp_path / "reviews.parquet"), text="review").setup("fit")


def test_jsonl_rows_and_missing_columns_are_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "tag": "ab"[i % 2]}) for i in range(40)))
    task = TextClassification(path=str(path), text="body", label="tag", tokenizer="chars")
    task.setup("fit")
    assert task.label_names == ["a", "b"]
    with pytest.raises(QkvError, match=r"task.data.label: .*rows.jsonl, line 1 has no column 'label' \(its columns: body, tag\)"):
        TextClassification(path=str(path), text="body").setup("fit")
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "a,x\n" * 10)
    with pytest.raises(QkvError, match=r"task.data.label: column 'label' holds one value \('x'\)"):
        TextClassification(path=str(one)).setup("fit")


@pytest.mark.slow
def test_a_sweep_classifies_the_rows_of_a_csv_file(tmp_path):
    from qkvsearch.search.study.sweep import sweep

    path = write_rows(tmp_path / "reviews.csv")
    cfg = compose_conf("sweep", ["task=text_classification", "space=encoder", f"task.data.path={path}",
                                 "task.data.text=review", "task.data.label=sentiment", "task.data.seq_len=32",
                                 "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
                                 f"run_root={tmp_path}", "n_trials=2", "pruner=none"])
    study = sweep(cfg)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(architecture(study, t).head.n_classes == 3 for t in study.trials)
