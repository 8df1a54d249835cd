"""The task contract and the pieces built-in tasks share.

A task is a ``lightning.LightningDataModule`` with these attributes:

- ``kind``: ``"language_model"``, ``"classification"`` or ``"seq2seq"``; it decides the
  loss and which architectures fit (see ``search/trial/lit.py``).
- ``vocab_size``: token ids are in ``[0, vocab_size)``.
- ``seq_len``: the longest sequence a batch holds (sizes the architecture's ``max_seq_len``).
- ``n_classes``: for classification only.
- ``name``: a short name used in study names.

Its loaders yield dict batches:

- language_model: ``tokens`` ``[batch, seq]``, ``targets`` ``[batch, seq]`` (``-100`` is
  ignored), optional ``padding_mask`` (True at real tokens);
- classification: ``tokens``, ``labels`` ``[batch]``, optional ``padding_mask``;
- seq2seq: ``src``, ``tgt_in``, ``tgt_out`` (``-100`` ignored), ``src_padding_mask``,
  ``tgt_padding_mask``.

``sample_batch(n)`` returns ``n`` validation examples (for attention maps and export
checks); ``trivial_loss()`` the validation loss of a predictor that ignores the input.
Optionally, ``token_text(id)`` names a token (attention maps label their axes with it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from qkvsearch.models.errors import QkvError

IGNORE = -100
KINDS = ("language_model", "classification", "seq2seq")


def model_inputs(kind: str, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A model's forward arguments for a task batch, padding masks included."""
    if kind == "seq2seq":
        return [batch[k] for k in ("src", "tgt_in", "src_padding_mask", "tgt_padding_mask")]
    mask = batch.get("padding_mask")
    return [batch["tokens"]] + ([mask] if mask is not None else [])


@runtime_checkable
class Task(Protocol):
    """The task contract (the module docstring says what each member means)."""

    kind: str
    vocab_size: int
    seq_len: int
    n_classes: int | None

    def setup(self, stage: str) -> None: ...

    def sample_batch(self, n: int) -> dict[str, torch.Tensor]: ...

    def trivial_loss(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class TaskSizes:
    """What spaces and architectures read of a task."""

    kind: str
    vocab_size: int
    seq_len: int
    n_classes: int | None


def check_task(task: object, name: str) -> TaskSizes:
    """Checks ``task`` against the contract, every problem at once, and returns its sizes.

    Raises:
        QkvError: naming the task, its class and each missing or bad member.
    """
    members = ("kind", "vocab_size", "seq_len", "n_classes", "setup", "sample_batch", "trivial_loss")
    problems = [f"lacks {m!r}" for m in members if not hasattr(task, m)]
    if not problems:
        if task.kind not in KINDS:
            problems.append(f"kind is {task.kind!r}; valid: {', '.join(KINDS)}")
        for size in ("vocab_size", "seq_len"):
            value = getattr(task, size)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{size} must be a positive int, got {value!r}")
        if task.kind == "classification" and (not isinstance(task.n_classes, int) or task.n_classes < 2):
            problems.append(f"n_classes must be an int >= 2 for classification, got {task.n_classes!r}")
    if problems:
        raise QkvError(f"task {name!r}: {type(task).__name__} does not meet the task contract (tasks/base.py): "
                       + "; ".join(problems))
    return TaskSizes(task.kind, task.vocab_size, task.seq_len, task.n_classes)


class Batches(IterableDataset):
    """Whole batches sliced from tensors sharing their first dimension.

    A shuffled pass draws a fresh permutation each time it is iterated; batches are
    built by indexing, with no per-example collation.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1:
            raise QkvError(f"tensors must share their first dimension, got sizes {sorted(sizes)}")
        self.tensors, self.batch_size, self.shuffle, self.drop_last = tensors, batch_size, shuffle, drop_last
        self.n = sizes.pop()
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield {k: v[index] for k, v in self.tensors.items()}


class TensorTask(L.LightningDataModule):
    """A task whose splits are tensors made in ``build()``; subclasses fill the contract."""

    name = "task"
    kind = "language_model"
    vocab_size = 0
    seq_len = 0
    n_classes = 0

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise QkvError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self._splits: dict[str, dict[str, torch.Tensor]] | None = None

    def build(self) -> dict[str, dict[str, torch.Tensor]]:
        """Returns ``{"train": tensors, "val": tensors, "test": tensors}``."""
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, dict[str, torch.Tensor]]:
        if self._splits is None:
            self._splits = self.build()
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018 - build once, before the loaders are asked for

    def train_dataloader(self) -> DataLoader:
        data = Batches(self.splits["train"], self.batch_size, shuffle=True, seed=self.seed, drop_last=True)
        return DataLoader(data, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        data = Batches(self.splits["val"], self.batch_size, shuffle=False, seed=self.seed, drop_last=False)
        return DataLoader(data, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        """The held-out test split: never trained on, never selected on."""
        if "test" not in self.splits:
            raise QkvError(f"task {self.name!r} has no test split")
        data = Batches(self.splits["test"], self.batch_size, shuffle=False, seed=self.seed, drop_last=False)
        return DataLoader(data, batch_size=None)

    def sample_batch(self, n: int = 1) -> dict[str, torch.Tensor]:
        """Returns the first ``n`` validation examples."""
        return {k: v[:n] for k, v in self.splits["val"].items()}

    def trivial_loss(self) -> float:
        """Validation loss of the best input-independent prediction (class/token frequencies)."""
        raise NotImplementedError


def frequency_loss(train: torch.Tensor, val: torch.Tensor, n: int) -> float:
    """Cross-entropy on ``val`` of the (add-one smoothed) frequencies of ``train``, in nats."""
    train, val = train[train != IGNORE], val[val != IGNORE]
    counts = torch.bincount(train.flatten(), minlength=n).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return float(-log_p[val.flatten()].mean())
