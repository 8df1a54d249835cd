"""Handwritten digit classification from scikit-learn's bundled data, as token sequences."""

from __future__ import annotations

import torch

from qkvsearch.models.errors import QkvError
from qkvsearch.tasks.base import TensorTask, frequency_loss


class Digits(TensorTask):
    """The 1,797 8x8 digits shipped with scikit-learn (UCI optical digits), each read row by
    row as 64 tokens of pixel intensity 0-16; the label is the digit.

    Args:
        val_fraction: share of images held out, chosen by a seeded permutation.
    """

    name = "digits"
    kind = "classification"
    vocab_size = 17
    seq_len = 64
    n_classes = 10

    def __init__(self, val_fraction: float = 0.2, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        if not 0 < val_fraction < 1:
            raise QkvError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = val_fraction

    def build(self) -> dict[str, dict[str, torch.Tensor]]:
        from sklearn.datasets import load_digits  # ships its data; nothing is downloaded

        digits = load_digits()
        tokens = torch.as_tensor(digits.data, dtype=torch.long)  # [n, 64], values 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(labels) * self.val_fraction)
        val, train = order[:n_val], order[n_val:]
        return {
            "train": {"tokens": tokens[train], "labels": labels[train]},
            "val": {"tokens": tokens[val], "labels": labels[val]},
        }

    def trivial_loss(self) -> float:
        return frequency_loss(self.splits["train"]["labels"], self.splits["val"]["labels"], self.n_classes)
