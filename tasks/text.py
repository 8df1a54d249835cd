"""Character-level language modelling over the Python standard library's own source."""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig

import torch

from qkvsearch.models.errors import QkvError
from qkvsearch.tasks.base import TensorTask, frequency_loss
from qkvsearch.tasks.tokenizer import Tokenizer

UNKNOWN = Tokenizer.ASCII_UNKNOWN  # every non-ASCII character maps here


def stdlib_files(root: str | None = None) -> list[pathlib.Path]:
    """The standard library's ``.py`` files in a fixed order (site-packages left out)."""
    base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"no standard library source at {base}")
    return sorted(p for p in base.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def is_validation(path: pathlib.Path, base: pathlib.Path, val_fraction: float) -> bool:
    """Splits by file: a stable hash of the relative path puts a file in one split."""
    digest = hashlib.sha256(str(path.relative_to(base)).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < val_fraction


def encode(text: str) -> torch.Tensor:
    """ASCII code points, with every other character as ``UNKNOWN``."""
    data = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    return torch.where(data < 128, data, torch.full_like(data, UNKNOWN))


class StdlibCharLM(TensorTask):
    """Predict the next character of Python source, train and validation split by file.

    Args:
        seq_len: characters per example.
        train_chars, val_chars: how much text each split reads.
        test_chars: how much the test split reads, from the files left after the train
            split has read its share (so train and validation do not depend on it).
        val_fraction: share of files that go to validation.
        batch_size, seed: loader settings.
        root: the source folder (the running Python's standard library by default).
    """

    name = "lm_stdlib"
    kind = "language_model"
    vocab_size = 128
    tokenizer = Tokenizer("ascii")  # what encode() does, one string at a time (for exports)

    def __init__(self, seq_len: int = 64, train_chars: int = 1_000_000, val_chars: int = 100_000,
                 val_fraction: float = 0.1, batch_size: int = 32, seed: int = 0, root: str | None = None,
                 test_chars: int = 100_000) -> None:
        super().__init__(batch_size, seed)
        if seq_len < 2 or train_chars < seq_len + 1 or val_chars < seq_len + 1 or not 0 < val_fraction < 1:
            raise QkvError(
                f"need seq_len >= 2 ({seq_len}), train_chars and val_chars > seq_len "
                f"({train_chars}, {val_chars}) and 0 < val_fraction < 1 ({val_fraction})"
            )
        self.seq_len, self.train_chars, self.val_chars = seq_len, train_chars, val_chars
        self.val_fraction, self.root, self.test_chars = val_fraction, root, test_chars

    def _read(self) -> dict[str, torch.Tensor]:
        files = stdlib_files(self.root)
        base = pathlib.Path(self.root or sysconfig.get_paths()["stdlib"])
        budget = {"train": self.train_chars, "val": self.val_chars, "test": self.test_chars}
        texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for path in files:
            split = "val" if is_validation(path, base, self.val_fraction) else "train"
            if split == "train" and budget["train"] <= 0:
                split = "test"  # a train file the train split no longer needs
            if budget[split] <= 0:
                if all(b <= 0 for b in budget.values()):
                    break
                continue
            text = path.read_text(encoding="utf-8", errors="replace")[: budget[split]]
            texts[split].append(text)
            budget[split] -= len(text)
        return {split: encode("\n".join(parts)) for split, parts in texts.items() if parts or split != "test"}

    def build(self) -> dict[str, dict[str, torch.Tensor]]:
        streams = self._read()
        splits = {}
        for split, stream in streams.items():
            n = (stream.numel() - 1) // self.seq_len
            if n < 1:
                raise QkvError(f"the {split} split has too little text for seq_len {self.seq_len}")
            windows = stream[: n * self.seq_len + 1]
            tokens = windows[:-1].view(n, self.seq_len)
            targets = windows[1:].view(n, self.seq_len)
            splits[split] = {"tokens": tokens, "targets": targets}
        return splits

    def trivial_loss(self) -> float:
        return frequency_loss(self.splits["train"]["targets"], self.splits["val"]["targets"], self.vocab_size)

    def token_text(self, token: int) -> str:
        """The character of a token, with whitespace made visible (for attention maps)."""
        return {9: "⇥", 10: "⏎", 32: "␣"}.get(token) or (chr(token) if 32 < token < 127 else f"<{token}>")
