"""task=text: a language model over the user's own files."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import optuna
import pytest

from qkvsearch.models.errors import QkvError
from qkvsearch.search.inspect.selection import architecture
from qkvsearch.tasks.corpus import TextCorpus, split_of
from tests.conftest import compose_conf

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxes".split()


def write_corpus(root: pathlib.Path, n_files: int = 40, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    (root / "corpus" / "deep").mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        folder = root / "corpus" / ("deep" if i % 3 else "")
        text = " ".join(rng.choice(WORDS, size=200)) + " é ü"
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return root / "corpus"


def corpus(tmp_path, **kwargs) -> TextCorpus:
    task = TextCorpus(paths=[str(tmp_path / "corpus" / "**" / "*.txt")], seq_len=16, batch_size=4,
                      cache_dir=str(tmp_path / "cache"), val_fraction=0.2, test_fraction=0.2, **kwargs)
    task.setup("fit")
    return task


@pytest.mark.parametrize(("tokenizer", "vocab"), [("bytes", None), ("chars", None), ("bpe", 300)])
def test_each_tokenizer_round_trips_the_text_and_the_windows_are_next_token_pairs(tmp_path, tokenizer, vocab):
    write_corpus(tmp_path)
    task = corpus(tmp_path, tokenizer=tokenizer, vocab_size=vocab)
    expected = {"bytes": 256, "chars": len(set(" ".join(WORDS) + " éü")) + 1, "bpe": 300}[tokenizer]
    assert task.vocab_size == expected
    text = "a lazy dog é"
    assert task.tokenizer.decode(task.tokenizer.encode(text)) == text
    batch = next(iter(task.train_dataloader()))
    assert batch["tokens"].shape == batch["targets"].shape == (4, 16)
    assert (batch["tokens"][:, 1:] == batch["targets"][:, :-1]).all()
    assert int(batch["tokens"].max()) < task.vocab_size
    assert 0 < task.trivial_loss() < np.log(task.vocab_size) + 1


def test_documents_split_by_a_stable_hash_disjoint_and_independent_of_other_files(tmp_path):
    write_corpus(tmp_path, n_files=60)
    task = corpus(tmp_path)
    docs = sorted((tmp_path / "corpus").rglob("*.txt"))
    splits = {d.name: split_of(str(d.resolve()), 0.2, 0.2) for d in docs}
    assert set(splits.values()) == {"train", "val", "test"}  # every split holds documents
    for split in ("train", "val", "test"):  # each split's tokens are exactly its documents'
        expected = sum(len((d.read_text(encoding="utf-8") + "\n\n").encode()) for d in docs if splits[d.name] == split)
        assert len(task.tokens[split]) == expected
    (tmp_path / "corpus" / "new.txt").write_text("another document")  # a new file moves no other one
    again = {d.name: split_of(str(d.resolve()), 0.2, 0.2) for d in docs}
    assert again == splits


def test_the_tokenized_corpus_is_cached_memory_mapped_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    first = corpus(tmp_path, tokenizer="chars")
    assert isinstance(first.tokens["train"], np.memmap) and first.memory_bytes == 0  # mapped, not read

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(TextCorpus, "_build", no_rebuild)
    again = corpus(tmp_path, tokenizer="chars")
    assert again.folder == first.folder and (np.asarray(again.tokens["val"]) == np.asarray(first.tokens["val"])).all()
    monkeypatch.undo()
    changed = next((tmp_path / "corpus").rglob("*.txt"))
    changed.write_text(changed.read_text(encoding="utf-8") + " changed", encoding="utf-8")
    rebuilt = corpus(tmp_path, tokenizer="chars")
    assert rebuilt.folder != first.folder and (rebuilt.folder / "meta.json").exists()


def test_jsonl_documents_and_their_errors_name_the_field_and_line(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps({"body": " ".join(WORDS * 5), "id": i}) for i in range(30)))
    task = TextCorpus(paths=[str(path)], text_field="body", seq_len=8, val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    task.setup("fit")
    assert sum(len(t) for t in task.tokens.values()) == 30 * len((" ".join(WORDS * 5) + "\n\n").encode())
    with pytest.raises(QkvError, match=r"task.data.text_field: .*notes.jsonl, line 1 has no 'text' \(its fields: body, id\)"):
        TextCorpus(paths=[str(path)], seq_len=8, cache_dir=str(tmp_path / "cache2")).setup("fit")


def test_parquet_rows_are_documents_read_in_batches_and_a_missing_column_is_named(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    bodies = [" ".join(WORDS[i % 5 :] * 4) for i in range(30)]
    path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"id": list(range(30)), "body": bodies}), path, row_group_size=7)
    task = TextCorpus(paths=[str(path)], text_field="body", seq_len=8, val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    task.setup("fit")
    texts = [task.tokenizer.decode(task.tokens[s].tolist()) for s in ("train", "val", "test")]
    documents = [d for text in texts for d in text.split("\n\n") if d]
    assert sorted(documents) == sorted(bodies)  # every row once, across row groups, in one split
    with pytest.raises(QkvError, match=r"task.data.text_field: .*notes.parquet has no column 'text' \(its columns: id, body\)"):
        TextCorpus(paths=[str(path)], seq_len=8, cache_dir=str(tmp_path / "cache2")).setup("fit")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"paths": ["nowhere/*.txt"]}, r"task.data.paths: 'nowhere/\*.txt' matches no file"),
    ({"tokenizer": "words"}, r"task.data.tokenizer: 'words'; valid: bytes, chars, bpe or a tokenizer.json path"),
    ({"tokenizer": "bpe"}, r"task.data.vocab_size: bpe needs an integer >= 260, got None"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, r"task.data.val_fraction \(0.6\) and test_fraction \(0.5\)"),
])
def test_bad_settings_name_the_field_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(QkvError, match=message):
        TextCorpus(**{"paths": [str(tmp_path / "*.txt")], "cache_dir": str(tmp_path), **kwargs}).setup("fit")


@pytest.mark.slow
def test_a_sweep_on_a_folder_of_text_files(tmp_path):
    from qkvsearch.search.study.sweep import sweep

    write_corpus(tmp_path)
    cfg = compose_conf("sweep", ["task=text", f"task.data.paths=[{tmp_path}/corpus/**/*.txt]", "task.data.seq_len=32",
                                 "task.data.val_fraction=0.2", "task.data.test_fraction=0.1", "task.data.val_batches=2",
                                 "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
                                 f"run_root={tmp_path}", "n_trials=2", "pruner=none"])
    study = sweep(cfg)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(architecture(study, t).vocab_size == 256 for t in study.trials)
    assert list((tmp_path / "cache").iterdir())  # tokenized once, under run_root/cache


def test_one_file_is_held_out_in_contiguous_pieces_and_says_so(tmp_path, capsys):
    from qkvsearch.tasks import TextCorpus

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(4000))  # ~220 KB
    (tmp_path / "input.txt").write_text(text)
    task = TextCorpus(paths=[str(tmp_path / "input.txt")], seq_len=64, cache_dir=str(tmp_path / "cache"))
    task.setup("fit")
    assert "1 document, too few to hold out whole ones: validation and test hold out contiguous pieces of 512" in \
        capsys.readouterr().out
    sizes = {split: len(tokens) for split, tokens in task.tokens.items()}
    assert sizes["val"] >= 64 + 2 and sizes["test"] > 0 and sizes["train"] > 10 * sizes["val"]
    val = bytes(task.tokens["val"][:512].tolist()).decode()
    assert val.split("\n\n")[0] in text  # a contiguous piece of the file
