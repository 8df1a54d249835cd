"""Handwritten digit classification from scikit-learn's bundled data, as token sequences."""

from __future__ import annotations

import torch

from qkvsearch.models.errors import QkvError
from qkvsearch.tasks.base import TensorTask, frequency_loss


class Digits(TensorTask):
    """The 1,797 8x8 digits shipped with scikit-learn (UCI optical digits), each read row by
    row as 64 tokens of pixel intensity 0-16; the label is the digit.

    Args:
        val_fraction, test_fraction: shares of images held out for validation and for the
            test, chosen by a seeded permutation.
    """

    name = "digits"
    kind = "classification"
    vocab_size = 17
    seq_len = 64
    n_classes = 10

    def __init__(self, val_fraction: float = 0.2, test_fraction: float = 0.2, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise QkvError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
                           "and leave images to train on")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def build(self) -> dict[str, dict[str, torch.Tensor]]:
        from sklearn.datasets import load_digits  # ships its data; nothing is downloaded

        digits = load_digits()
        tokens = torch.as_tensor(digits.data, dtype=torch.long)  # [n, 64], values 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = int(len(labels) * self.val_fraction), int(len(labels) * self.test_fraction)
        val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        return {split: {"tokens": tokens[index], "labels": labels[index]}
                for split, index in (("train", train), ("val", val), ("test", test))}

    def trivial_loss(self) -> float:
        return frequency_loss(self.splits["train"]["labels"], self.splits["val"]["labels"], self.n_classes)
