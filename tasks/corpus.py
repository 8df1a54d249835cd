"""Language modelling on the user's own text files: ``qkv sweep task=text task.data.paths=[...]``.

The files (``.txt`` and other plain text: one document per file; ``.jsonl`` and
``.parquet``: one document per line or row, its ``text_field``) are split into train, validation and test by document, with a
stable hash of the document's path (and line), so a split never changes when other files
come or go. The corpus is tokenized once, with a progress bar, into one flat token file per
split (uint16, or uint32 for vocabularies over 65,536) under ``cache_dir/<key>``, where the
key is a digest of the files' contents, the tokenizer and the split. The next sweep on the
same files starts at once, and a changed file makes a new key. Training batches are random
windows read from the memory-mapped train file, so a corpus larger than memory trains too.

Tokenizers: ``bytes`` (UTF-8 bytes, 256 ids, nothing to train), ``chars`` (the train
split's characters, one id each, 0 for any other), ``bpe`` (byte-level BPE of
``vocab_size`` ids trained on the train split with the ``tokenizers`` library), or the path
of a ``tokenizer.json`` of the ``tokenizers`` library.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from qkvsearch.models.errors import QkvError
from qkvsearch.tasks import hf_datasets
from qkvsearch.tasks.tokenizer import Tokenizer, tokenizer_problems, train_tokenizer

SPLITS = ("train", "val", "test")
SEPARATOR = "\n\n"  # between documents in a split's token stream
#: a corpus of fewer documents than this cannot hold whole ones out: it holds out pieces of them,
MIN_DOCUMENTS = 20
#: each this many sequences long (in characters, at seq_len characters a sequence)
CHUNK_SEQUENCES = 8
_READ = 1 << 20


def find_files(patterns: list[str]) -> list[pathlib.Path]:
    """The files the glob ``patterns`` match (``**`` spans folders), sorted, each once."""
    found: set[pathlib.Path] = set()
    for pattern in patterns:
        matches = [pathlib.Path(p) for p in glob.glob(os.path.expanduser(str(pattern)), recursive=True)]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise QkvError(f"task.data.paths: {pattern!r} matches no file (from {os.getcwd()})")
        found.update(p.resolve() for p in files)
    return sorted(found)


def parquet_columns(path: pathlib.Path, columns: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The rows of a parquet file, read in batches of the ``columns`` asked for (``{field: column}``,
    the field being the config key that names the column)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QkvError(f"{path}: reading parquet needs pyarrow (pip install 'qkvsearch[parquet]')") from None
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    for field, column in columns.items():
        if column not in names:
            raise QkvError(f"{field}: {path} has no column {column!r} (its columns: {', '.join(names)})")
    for batch in parquet.iter_batches(batch_size=4096, columns=list(dict.fromkeys(columns.values()))):
        yield from batch.to_pylist()


def documents(path: pathlib.Path, text_field: str) -> Iterator[tuple[str, str]]:
    """``(id, text)`` of each document in ``path``: the file itself, each JSON line, or each parquet row."""
    if path.suffix == ".parquet":
        for number, record in enumerate(parquet_columns(path, {"task.data.text_field": text_field})):
            if record[text_field] is not None:
                yield f"{path}:{number}", str(record[text_field])
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise QkvError(f"task.data.text_field: {path}, line {number + 1} has no {text_field!r} "
                                   f"(its fields: {', '.join(sorted(record))})")
                yield f"{path}:{number}", str(record[text_field])
    else:
        yield str(path), path.read_text(encoding="utf-8", errors="replace")


def split_of(document_id: str, val_fraction: float, test_fraction: float) -> str:
    """A document's split, from a stable hash of its id."""
    u = int.from_bytes(hashlib.sha256(document_id.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def digest_files(files: list[pathlib.Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_READ):
                digest.update(chunk)
    return digest.hexdigest()


class Windows(IterableDataset):
    """Batches of ``seq_len + 1``-token windows of a memory-mapped token file: random
    windows (``shuffle``, a fresh draw each pass) or consecutive ones (at most ``limit``
    batches of them, spread evenly over the file)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, shuffle: bool, seed: int,
                 limit: int | None = None) -> None:
        self.tokens, self.seq_len, self.batch_size, self.shuffle = tokens, seq_len, batch_size, shuffle
        self.n = (len(tokens) - 1) // seq_len if not shuffle else len(tokens) - seq_len - 1
        self.available = max(1, (len(tokens) - 1) // (seq_len * batch_size))
        self.batches = self.available if limit is None else min(self.available, limit)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.batches

    def batch(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        return {"tokens": data[:, :-1], "targets": data[:, 1:]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.batches):
            if self.shuffle:
                starts = torch.randint(0, self.n + 1, (self.batch_size,), generator=self.generator).numpy()
            else:
                first = (i * self.available // self.batches) * self.batch_size
                starts = np.arange(first, min(first + self.batch_size, self.n)) * self.seq_len
            yield self.batch(starts)


class TextCorpus(L.LightningDataModule):
    """A language model over the user's text files (the module docstring says how).

    Args:
        paths: glob patterns of the files (``corpus/**/*.txt``, ``data/*.jsonl``); or
        dataset: a Hugging Face dataset instead (``tasks/hf_datasets.py``), its ``text_field`` column.
        tokenizer: ``bytes``, ``chars``, ``bpe`` or a ``tokenizer.json`` path.
        vocab_size: the BPE vocabulary to train (``bpe`` only).
        text_field: the field of a ``.jsonl`` record that holds the text.
        seq_len: tokens per example.
        val_fraction, test_fraction: shares of the documents held out.
        val_batches: the most validation batches a pass reads.
        test_batches: the most test batches a trial's test score reads (spread over the split).
        batch_size, seed: loader settings.
        cache_dir: where tokenized corpora are kept.
    """

    name = "text"
    kind = "language_model"
    n_classes = None

    def __init__(self, paths: list[str] | None = None, tokenizer: str = "bytes", vocab_size: int | None = None,
                 text_field: str = "text", seq_len: int = 256, val_fraction: float = 0.05, test_fraction: float = 0.05,
                 val_batches: int = 50, test_batches: int = 200, batch_size: int = 32, seed: int = 0,
                 cache_dir: str = "runs/cache", dataset: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(paths, str):
            paths = [paths]
        problems = []
        if not paths and dataset is None:
            problems.append("task.data.paths: give at least one glob pattern, e.g. [corpus/**/*.txt], "
                            "or a Hugging Face dataset (task.data.dataset)")
        if paths and dataset is not None:
            problems.append("task.data: give paths or a dataset, not both")
        problems += tokenizer_problems(tokenizer, vocab_size)
        if not isinstance(seq_len, int) or seq_len < 2:
            problems.append(f"task.data.seq_len must be an integer >= 2, got {seq_len!r}")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            problems.append(f"task.data.val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be "
                            "shares in [0, 1) that leave documents to train on, val_fraction > 0")
        if problems:
            raise QkvError("; ".join(problems))
        self.paths, self.tokenizer_name, self.requested_vocab = list(paths or []), str(tokenizer), vocab_size
        self.dataset = dict(dataset) if dataset is not None else None
        self.text_field, self.seq_len = text_field, seq_len
        self.val_fraction, self.test_fraction, self.val_batches = val_fraction, test_fraction, val_batches
        self.test_batches = test_batches
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, pathlib.Path(cache_dir)
        self.tokens: dict[str, np.ndarray] = {}
        self.tokenizer: Tokenizer | None = None
        self.folder: pathlib.Path | None = None
        self.vocab_size = 256 if tokenizer == "bytes" else 0

    # -- building the cache --------------------------------------------------------------

    def key(self, source: list[pathlib.Path] | Any) -> str:
        content = digest_files(source) if isinstance(source, list) else hf_datasets.fingerprint(source)
        spec = json.dumps([content, self.tokenizer_name, self.requested_vocab, self.text_field,
                           self.val_fraction, self.test_fraction, SEPARATOR, MIN_DOCUMENTS, CHUNK_SEQUENCES, self.seq_len])
        if self.tokenizer_name.endswith(".json"):
            spec += digest_files([pathlib.Path(self.tokenizer_name)])
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    def _documents(self, source: list[pathlib.Path] | Any) -> Iterator[tuple[str, str]]:
        """``(id, text)`` of every document of the files (a list) or the dataset."""
        if isinstance(source, list):
            return (doc for path in source for doc in documents(path, self.text_field))
        return hf_datasets.texts(source, self.text_field)

    def _split_documents(self, source: list[pathlib.Path] | Any, split: str, chunk: int = 0) -> Iterator[str]:
        """The texts of one split: whole documents, or with ``chunk`` (a corpus of too few
        documents to hold any out whole) contiguous pieces of ``chunk`` characters of them."""
        for document_id, text in self._documents(source):
            pieces = [(document_id, text)] if not chunk else [
                (f"{document_id}#{i}", text[start:start + chunk]) for i, start in enumerate(range(0, len(text), chunk))]
            for piece_id, piece in pieces:
                if split_of(piece_id, self.val_fraction, self.test_fraction) == split:
                    yield piece

    def _build(self, files: list[pathlib.Path] | Any, folder: pathlib.Path) -> None:
        from tqdm.auto import tqdm

        building = folder.with_name(folder.name + f".building-{os.getpid()}")
        building.mkdir(parents=True, exist_ok=True)
        n_documents = sum(1 for _ in self._documents(files))
        chunk = CHUNK_SEQUENCES * self.seq_len if n_documents < MIN_DOCUMENTS else 0
        if chunk:
            print(f"task.data: {n_documents} document{'s' if n_documents != 1 else ''}, too few to hold out whole "
                  f"ones: validation and test hold out contiguous pieces of {chunk} characters instead", flush=True)
        tokenizer = train_tokenizer(self.tokenizer_name, self._split_documents(files, "train", chunk), self.requested_vocab)
        tokenizer.save(building)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        sizes = {}
        for split in SPLITS:
            count = 0
            with open(building / f"{split}.bin", "wb") as out:
                texts = self._split_documents(files, split, chunk)
                for text in tqdm(texts, desc=f"tokenizing {split}", unit=" docs", leave=False, disable=None):
                    if tokenizer.kind == "bytes":  # the same ids as encode(), without a list of ints
                        ids = np.frombuffer((text + SEPARATOR).encode("utf-8"), dtype=np.uint8).astype(dtype)
                    else:
                        ids = np.asarray(tokenizer.encode(text + SEPARATOR), dtype=dtype)
                    out.write(ids.tobytes())
                    count += len(ids)
            sizes[split] = count
        meta = {"tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
                "tokens": sizes, "files": [str(p) for p in files] if isinstance(files, list) else self.dataset,
                "held_out": f"pieces of {chunk} characters" if chunk else "whole documents"}
        (building / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            building.rename(folder)  # whole or not at all: a sweep's other workers may be building it too
        except OSError:
            if not (folder / "meta.json").exists():
                raise

    def setup(self, stage: str | None = None) -> None:
        if self.tokens:
            return
        files = find_files(self.paths) if self.dataset is None else hf_datasets.load(self.dataset)
        folder = self.cache_dir / self.key(files)
        if not (folder / "meta.json").exists():
            self._build(files, folder)
        meta = json.loads((folder / "meta.json").read_text())
        self.folder, self.vocab_size = folder, meta["vocab_size"]
        self.tokenizer = Tokenizer.load(meta["tokenizer"], folder)
        for split in SPLITS:
            n = meta["tokens"][split]
            self.tokens[split] = (np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")
                                  if n else np.zeros(0, dtype=meta["dtype"]))
        for split in ("train", "val"):
            if len(self.tokens[split]) < self.seq_len + 2:
                raise QkvError(f"task.data: the {split} split holds {len(self.tokens[split])} tokens, fewer than "
                               f"seq_len + 2 ({self.seq_len + 2}); add text or lower seq_len or the held-out fractions")

    # -- the task contract ---------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Windows(self.tokens["train"], self.seq_len, self.batch_size, True, self.seed), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        data = Windows(self.tokens["val"], self.seq_len, self.batch_size, False, self.seed, limit=self.val_batches)
        return DataLoader(data, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        if len(self.tokens["test"]) < self.seq_len + 2:
            raise QkvError("task.data.test_fraction: the test split is empty or shorter than one example")
        data = Windows(self.tokens["test"], self.seq_len, self.batch_size, False, self.seed, limit=self.test_batches)
        return DataLoader(data, batch_size=None)

    def sample_batch(self, n: int = 1) -> dict[str, torch.Tensor]:
        windows = Windows(self.tokens["val"], self.seq_len, n, False, self.seed)
        return windows.batch(np.arange(min(n, windows.n)) * self.seq_len)

    def trivial_loss(self) -> float:
        """Validation loss of the train split's (add-one smoothed) token frequencies, from up to
        10 M train and 1 M validation tokens, read a chunk at a time (the splits stay mapped)."""
        chunk = 1 << 20
        counts = np.ones(self.vocab_size)
        train = self.tokens["train"][:10_000_000]
        for start in range(0, len(train), chunk):
            counts += np.bincount(train[start : start + chunk], minlength=self.vocab_size)
        log_p = np.log(counts / counts.sum())
        val = self.tokens["val"][:1_000_000]
        return float(-sum(log_p[val[start : start + chunk]].sum() for start in range(0, len(val), chunk)) / len(val))

    def token_text(self, token: int) -> str:
        text = self.tokenizer.decode([token]) if self.tokenizer else str(token)
        return {"\n": "⏎", " ": "␣", "\t": "⇥"}.get(text, text)

    @property
    def memory_bytes(self) -> int:
        """Bytes of token data this task holds in memory (its splits are mapped, not read)."""
        return sum(t.nbytes for t in self.tokens.values() if not isinstance(t, np.memmap))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s} {len(t):,}" for s, t in self.tokens.items())
        return f"TextCorpus({self.paths}, tokenizer={self.tokenizer_name}, vocab {self.vocab_size}; tokens: {sizes})"

