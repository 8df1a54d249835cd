"""Text to token ids and back, as the text tasks train on it.

:class:`Tokenizer` depends on nothing of qkvsearch (``tokenizers`` only for BPE and
``tokenizer.json`` files): ``qkv export`` copies its source into an exported ``model.py``,
so an exported model reads text exactly as its task did.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch

#: The kinds a task config may name (or the path of a ``tokenizer.json``).
TOKENIZERS = ("bytes", "chars", "bpe")


class Tokenizer:
    """One of: ``bytes`` (UTF-8 bytes, 256 ids), ``ascii`` (code points below 128, every
    other character 127: the ``lm_stdlib`` task), ``chars`` (id ``i + 1`` for ``chars[i]``,
    0 for any other character), or a ``tokenizers`` library tokenizer (``bpe``, ``file``)."""

    ASCII_UNKNOWN = 127

    def __init__(self, kind: str, chars: list[str] | None = None, hf: Any = None) -> None:
        self.kind, self.chars, self.hf = kind, chars, hf
        self.index = {c: i + 1 for i, c in enumerate(chars)} if chars is not None else None

    @property
    def vocab_size(self) -> int:
        if self.kind in ("bytes", "ascii"):
            return 256 if self.kind == "bytes" else 128
        if self.kind == "chars":
            return len(self.chars) + 1
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        if self.kind == "ascii":
            return [c if c < 128 else self.ASCII_UNKNOWN for c in map(ord, text)]
        if self.kind == "chars":
            return [self.index.get(c, 0) for c in text]
        return self.hf.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.kind == "ascii":
            return "".join(chr(i) if 0 <= i < 128 else "\ufffd" for i in ids)
        if self.kind == "chars":
            return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd" for i in ids)
        return self.hf.decode(ids)

    def save(self, folder: pathlib.Path) -> None:
        """Writes what :meth:`load` reads: ``chars.json`` or ``tokenizer.json`` (bytes and ascii need nothing)."""
        if self.kind == "chars":
            (folder / "chars.json").write_text(json.dumps(self.chars))
        elif self.hf is not None:
            self.hf.save(str(folder / "tokenizer.json"))

    @classmethod
    def load(cls, kind: str, folder: pathlib.Path) -> Tokenizer:
        if kind in ("bytes", "ascii"):
            return cls(kind)
        if kind == "chars":
            return cls("chars", chars=json.loads((folder / "chars.json").read_text()))
        from tokenizers import Tokenizer as HFTokenizer

        return cls(kind, hf=HFTokenizer.from_file(str(folder / "tokenizer.json")))


def tokenizer_problems(tokenizer: str, vocab_size: Any) -> list[str]:
    """What is wrong with a task config's ``tokenizer`` and ``vocab_size`` (empty: nothing)."""
    problems = []
    if tokenizer not in TOKENIZERS and not str(tokenizer).endswith(".json"):
        problems.append(f"task.data.tokenizer: {tokenizer!r}; valid: {', '.join(TOKENIZERS)} or a tokenizer.json path")
    if tokenizer == "bpe" and (not isinstance(vocab_size, int) or vocab_size < 260):
        problems.append(f"task.data.vocab_size: bpe needs an integer >= 260, got {vocab_size!r}")
    return problems


def padded_rows(rows: list[list[int]], seq_len: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[len(rows), seq_len]`` token ids and padding mask (True at real tokens) of token rows,
    each cut to ``seq_len`` (an empty row becomes one token 0): how a classification task's
    texts reach the model, here and in an export."""
    tokens = torch.zeros(len(rows), seq_len, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        row = row[:seq_len] or [0]
        tokens[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = True
    return tokens, mask


def train_tokenizer(kind: str, texts: Any, vocab_size: int | None) -> Tokenizer:
    """Builds a tokenizer from the train split's ``texts`` (an iterable of strings): ``kind`` is
    one of :data:`TOKENIZERS` or the path of a ``tokenizer.json``."""
    if kind == "bytes":
        return Tokenizer("bytes")
    if kind == "chars":
        return Tokenizer("chars", chars=sorted(set().union(*(set(t) for t in texts))))
    from tokenizers import Tokenizer as HFTokenizer

    if kind != "bpe":  # a tokenizer.json of the user's
        return Tokenizer("file", hf=HFTokenizer.from_file(kind))
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer("bpe", hf=hf)
