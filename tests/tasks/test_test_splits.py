"""Every built-in task holds out a test split, and a sweep reports its best trials on it."""

from __future__ import annotations

import pytest
import torch

from qkvsearch.search.inspect.selection import architecture
from qkvsearch.tasks import AssociativeRecall, Digits, Reverse, StdlibCharLM


def test_digits_hold_out_a_test_split_disjoint_from_train_and_validation():
    task = Digits(val_fraction=0.2, test_fraction=0.2)
    sizes = {split: len(tensors["labels"]) for split, tensors in task.splits.items()}
    assert sizes == {"train": 1797 - 2 * 359, "val": 359, "test": 359}
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    assert set(order[359:718].tolist()).isdisjoint(order[718:].tolist())  # test images are not trained on
    assert len(next(iter(task.test_dataloader()))["labels"]) == 64


@pytest.mark.parametrize("cls", [AssociativeRecall, Reverse])
def test_a_generated_tasks_test_split_leaves_train_and_validation_as_they_were(cls):
    task = cls(n_train=200, n_val=50)
    generator = torch.Generator().manual_seed(0)
    train, val = task._generate(200, generator), task._generate(50, generator)  # what the splits were before
    for split, expected in (("train", train), ("val", val)):
        for key, value in expected.items():
            assert torch.equal(task.splits[split][key], value)
    first = next(iter(val))  # tokens, or src for sequence to sequence
    assert len(task.splits["test"][first]) == 50
    assert not torch.equal(task.splits["test"][first], task.splits["val"][first])


def test_the_stdlib_test_split_reads_files_the_train_split_did_not_need():
    with_test = StdlibCharLM(train_chars=20_000, val_chars=5_000, test_chars=5_000)
    without = StdlibCharLM(train_chars=20_000, val_chars=5_000, test_chars=0)
    for split in ("train", "val"):
        assert torch.equal(with_test.splits[split]["tokens"], without.splits[split]["tokens"])
    assert "test" not in without.splits and with_test.splits["test"]["tokens"].numel() >= 4_000


@pytest.mark.slow
def test_a_sweep_reports_its_best_trials_on_the_test_split(tmp_path, capsys):
    from qkvsearch.search.inspect.artifacts import trial_weights
    from qkvsearch.search.study.prepare import build_task
    from qkvsearch.search.study.sweep import sweep
    from qkvsearch.search.trial.evaluate import score
    from tests.conftest import tiny_sweep_conf

    cfg = tiny_sweep_conf(tmp_path, "n_trials=2", "pruner=none")
    study = sweep(cfg)
    scores = study.user_attrs["test_scores"]
    assert set(scores) == {str(t.number) for t in study.trials}  # both are among the best 3
    task = build_task(cfg)
    for trial in study.trials:
        again = score(architecture(study, trial), task.kind, trial_weights(study, trial, tmp_path),
                      task.test_dataloader())
        assert again == pytest.approx(scores[str(trial.number)])
        assert scores[str(trial.number)]["test_loss"] != pytest.approx(trial.values[0])  # another split, another number
    assert "test_loss" in capsys.readouterr().out
    from qkvsearch.search.commands.report import trials_table

    table = trials_table(study)
    assert "<th>test_loss</th><th>test_acc</th>" in table
    assert f"<td>{scores[str(study.trials[0].number)]['test_loss']:.4g}</td>" in table


def test_the_lm_stdlib_tokenizer_an_export_carries_encodes_as_the_task_does():
    from qkvsearch.tasks.text import StdlibCharLM, encode

    text = "def f(x):\n\treturn x  # é ✓\n"
    tokenizer = StdlibCharLM.tokenizer
    assert tokenizer.encode(text) == encode(text).tolist()
    assert tokenizer.decode(tokenizer.encode("def f(x):\n")) == "def f(x):\n" and tokenizer.vocab_size == 128
