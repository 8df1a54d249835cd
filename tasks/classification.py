"""Classification of the user's own rows: ``qkv sweep task=text_classification``.

The rows of a ``.csv``/``.tsv``/``.jsonl``/``.parquet`` file, classified by one of their columns, with the
tokenizers of ``task=text`` (``tasks/corpus.py``).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from qkvsearch.models.errors import QkvError
from qkvsearch.tasks import hf_datasets
from qkvsearch.tasks.base import Batches, frequency_loss
from qkvsearch.tasks.corpus import find_files, parquet_columns
from qkvsearch.tasks.tokenizer import Tokenizer, padded_rows, tokenizer_problems, train_tokenizer


def labelled_rows(path: pathlib.Path, text: str, label: str) -> list[tuple[str, str]]:
    """``(text, label)`` rows of a ``.csv``/``.tsv`` (with a header), ``.jsonl`` or ``.parquet`` file."""
    if path.suffix == ".parquet":
        columns = {"task.data.text": text, "task.data.label": label}
        records = [(i + 1, r) for i, r in enumerate(parquet_columns(path, columns))]
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            records = [(i + 1, json.loads(line)) for i, line in enumerate(f) if line.strip()]
    elif path.suffix in (".csv", ".tsv"):
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            records = list(enumerate(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","), start=2))
    else:
        raise QkvError(f"task.data.path: {path} is neither .csv, .tsv, .jsonl nor .parquet")
    rows = []
    for line, record in records:
        for field, key in (("text", text), ("label", label)):
            if key not in record:
                raise QkvError(f"task.data.{field}: {path}, line {line} has no column {key!r} "
                               f"(its columns: {', '.join(sorted(record))})")
        rows.append((str(record[text]), str(record[label])))
    if not rows:
        raise QkvError(f"task.data.path: {path} holds no rows")
    return rows


class TextClassification(L.LightningDataModule):
    """Classify the texts of a ``.csv``/``.tsv``/``.jsonl``/``.parquet`` file by one of its columns.

    Labels are mapped to ids in sorted order (``label_names``); the split into train,
    validation and test is stratified (each label's rows are shared out in the same
    proportions, by a seeded shuffle); texts are tokenized as for ``task=text`` and cut to
    ``seq_len`` tokens, with padding masks.
    """

    name = "text_classification"
    kind = "classification"

    def __init__(self, path: str | None = None, text: str = "text", label: str = "label", tokenizer: str = "bytes",
                 vocab_size: int | None = None, seq_len: int = 128, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, batch_size: int = 32, seed: int = 0,
                 dataset: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        problems = tokenizer_problems(tokenizer, vocab_size)
        if (path is None) == (dataset is None):
            problems.append("task.data: give a path (a .csv, .tsv, .jsonl or .parquet file) or a Hugging Face dataset "
                            "(task.data.dataset), one of them")
        if problems:
            raise QkvError("; ".join(problems))
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise QkvError(f"task.data.val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be "
                           "shares in [0, 1) that leave rows to train on, val_fraction > 0")
        self.path, self.text, self.label = path, text, label
        self.dataset = dict(dataset) if dataset is not None else None
        self.tokenizer_name, self.requested_vocab, self.seq_len = str(tokenizer), vocab_size, seq_len
        self.val_fraction, self.test_fraction, self.batch_size, self.seed = val_fraction, test_fraction, batch_size, seed
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.label_names: list[str] = []
        self.tokenizer: Tokenizer | None = None
        self.vocab_size, self.n_classes = 256 if tokenizer == "bytes" else 0, 0

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.dataset is not None:
            path = f"dataset {self.dataset}"
            rows = hf_datasets.labelled(hf_datasets.load(self.dataset), self.text, self.label)
        else:
            files = find_files([self.path])
            if len(files) != 1:
                raise QkvError(f"task.data.path: {self.path!r} matches {len(files)} files; give one file")
            path = files[0]
            rows = labelled_rows(path, self.text, self.label)
        self.label_names = sorted({label for _, label in rows})
        if len(self.label_names) < 2:
            raise QkvError(f"task.data.label: column {self.label!r} holds one value ({self.label_names[0]!r}); "
                           "classification needs two or more")
        self.n_classes = len(self.label_names)
        ids = {name: i for i, name in enumerate(self.label_names)}
        labels = torch.tensor([ids[label] for _, label in rows])
        generator = torch.Generator().manual_seed(self.seed)
        members: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for label in range(self.n_classes):  # stratified: every label in the same proportions
            rows_of = torch.nonzero(labels == label).flatten()
            rows_of = rows_of[torch.randperm(len(rows_of), generator=generator)].tolist()
            n_val = max(1, round(len(rows_of) * self.val_fraction)) if len(rows_of) > 2 else 0
            n_test = round(len(rows_of) * self.test_fraction)
            members["val"] += rows_of[:n_val]
            members["test"] += rows_of[n_val : n_val + n_test]
            members["train"] += rows_of[n_val + n_test :]
        train_texts = [rows[i][0] for i in members["train"]]
        self.tokenizer = train_tokenizer(self.tokenizer_name, iter(train_texts), self.requested_vocab)
        self.vocab_size = self.tokenizer.vocab_size
        for split, index in members.items():
            tokens, mask = padded_rows([self.tokenizer.encode(rows[i][0]) for i in index], self.seq_len)
            self.splits[split] = {"tokens": tokens, "padding_mask": mask, "labels": labels[index]}
        if not len(self.splits["val"]["labels"]):
            raise QkvError(f"task.data: too few rows in {path} for a validation split; raise val_fraction or add rows")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(Batches(self.splits[split], self.batch_size, shuffle=shuffle, seed=self.seed, drop_last=False),
                          batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        if not len(self.splits["test"]["labels"]):
            raise QkvError("task.data.test_fraction: the test split is empty")
        return self._loader("test", False)

    def sample_batch(self, n: int = 1) -> dict[str, torch.Tensor]:
        return {k: v[:n] for k, v in self.splits["val"].items()}

    def trivial_loss(self) -> float:
        return frequency_loss(self.splits["train"]["labels"], self.splits["val"]["labels"], self.n_classes)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer else str(token)
