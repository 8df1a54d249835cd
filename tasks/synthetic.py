"""Synthetic tasks generated from a seed: associative recall and sequence reversal."""

from __future__ import annotations

import math

import torch

from qkvsearch.models.errors import QkvError
from qkvsearch.tasks.base import IGNORE, TensorTask


class GeneratedTask(TensorTask):
    """A task whose splits are drawn from one seeded generator: ``n_train``, then ``n_val``
    examples of ``_generate``, then as many for the test split (drawn last, so the train
    and validation examples are the same as without it)."""

    def __init__(self, n_train: int, n_val: int, batch_size: int, seed: int) -> None:
        super().__init__(batch_size, seed)
        if n_train < 1 or n_val < 1:
            raise QkvError(f"n_train ({n_train}) and n_val ({n_val}) must be >= 1")
        self.n_train, self.n_val = n_train, n_val

    def _generate(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build(self) -> dict[str, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        train, val = self._generate(self.n_train, generator), self._generate(self.n_val, generator)
        return {"train": train, "val": val, "test": self._generate(self.n_val, generator)}


class AssociativeRecall(GeneratedTask):
    """Key-value pairs, then a query key; the model must name the query's value.

    A sequence is ``k1 v1 k2 v2 ... kn vn SEP q`` and only the last position is scored,
    against ``v(q)``: retrieval over the whole context, which needs attention
    (Ba et al., 2016; Fu et al., 2023, "Hungry Hungry Hippos").

    Args:
        n_pairs: pairs per sequence (distinct keys).
        n_keys, n_values: sizes of the key and value alphabets.
        n_train, n_val: examples per split.
    """

    name = "recall"
    kind = "language_model"

    def __init__(self, n_pairs: int = 8, n_keys: int = 16, n_values: int = 16, n_train: int = 20000,
                 n_val: int = 1000, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(n_train, n_val, batch_size, seed)
        if not 1 <= n_pairs <= n_keys or n_values < 2:
            raise QkvError(f"need 1 <= n_pairs ({n_pairs}) <= n_keys ({n_keys}) and n_values >= 2 ({n_values})")
        self.n_pairs, self.n_keys, self.n_values = n_pairs, n_keys, n_values
        self.separator = n_keys + n_values
        self.vocab_size = n_keys + n_values + 1
        self.seq_len = 2 * n_pairs + 2

    def _generate(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        keys = torch.rand(n, self.n_keys, generator=generator).argsort(-1)[:, : self.n_pairs]
        values = torch.randint(self.n_keys, self.n_keys + self.n_values, (n, self.n_pairs), generator=generator)
        pick = torch.randint(0, self.n_pairs, (n,), generator=generator)
        rows = torch.arange(n)
        tokens = torch.empty(n, self.seq_len, dtype=torch.long)
        tokens[:, 0 : 2 * self.n_pairs : 2] = keys
        tokens[:, 1 : 2 * self.n_pairs : 2] = values
        tokens[:, -2] = self.separator
        tokens[:, -1] = keys[rows, pick]
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = values[rows, pick]
        return {"tokens": tokens, "targets": targets}

    def trivial_loss(self) -> float:
        return math.log(self.n_values)


PAD, BOS, EOS = 0, 1, 2


class Reverse(GeneratedTask):
    """Sequence-to-sequence: output the input sequence reversed, then end-of-sequence.

    Sources are random symbols of random length in ``[min_len, max_len]``, padded.

    Args:
        n_symbols: alphabet size (ids start after the PAD, BOS and EOS tokens).
        min_len, max_len: source lengths.
        n_train, n_val: examples per split.
    """

    name = "reverse"
    kind = "seq2seq"

    def __init__(self, n_symbols: int = 10, min_len: int = 4, max_len: int = 12, n_train: int = 20000,
                 n_val: int = 1000, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(n_train, n_val, batch_size, seed)
        if n_symbols < 2 or not 1 <= min_len <= max_len:
            raise QkvError(f"need n_symbols >= 2 ({n_symbols}) and 1 <= min_len ({min_len}) <= max_len ({max_len})")
        self.n_symbols, self.min_len, self.max_len = n_symbols, min_len, max_len
        self.vocab_size = n_symbols + 3
        self.seq_len = max_len + 1

    def _generate(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = torch.randint(self.min_len, self.max_len + 1, (n,), generator=generator)
        symbols = torch.randint(3, self.vocab_size, (n, self.max_len), generator=generator)
        position = torch.arange(self.max_len)[None, :]
        src_real = position < lengths[:, None]
        src = torch.where(src_real, symbols, PAD)
        # reversed source: position i holds symbol (length - 1 - i)
        index = (lengths[:, None] - 1 - position).clamp(min=0)
        reversed_ = torch.where(src_real, symbols.gather(1, index), PAD)
        tgt_out = torch.cat([reversed_, torch.full((n, 1), PAD)], 1)
        tgt_out[torch.arange(n), lengths] = EOS
        tgt_in = torch.cat([torch.full((n, 1), BOS), tgt_out[:, :-1]], 1)
        tgt_real = torch.arange(self.max_len + 1)[None, :] <= lengths[:, None]
        return {
            "src": torch.cat([src, torch.full((n, 1), PAD)], 1),
            "src_padding_mask": torch.cat([src_real, torch.zeros(n, 1, dtype=torch.bool)], 1),
            "tgt_in": torch.where(tgt_real, tgt_in, PAD),
            "tgt_out": torch.where(tgt_real, tgt_out, IGNORE),
            "tgt_padding_mask": tgt_real,
        }

    def trivial_loss(self) -> float:
        # each target is one of the symbols or EOS, uniformly at best without the input
        return math.log(self.n_symbols + 1)
