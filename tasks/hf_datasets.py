"""Hugging Face datasets as a text task's data (``task.data.dataset``).

``{name: imdb, config: null, split: train}`` reads a dataset through ``datasets.load_dataset``
(the local cache serves it offline; ``data_files`` passes files to a builder such as ``csv``);
``{path: my_dataset}`` reads one written by ``Dataset.save_to_disk``. ``datasets`` is imported
only when a task names a dataset (``pip install 'qkvsearch[hf]'``).
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

from qkvsearch.models.errors import QkvError

KEYS = ("name", "config", "split", "path", "data_files")


def load(spec: Mapping[str, Any]) -> Any:
    """The ``datasets.Dataset`` a task's ``dataset`` setting names.

    Raises:
        QkvError: a key that is not one of :data:`KEYS`, neither or both of name and path, or
            a dataset that cannot be read (the message says why).
    """
    spec = dict(spec)
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise QkvError(f"task.data.dataset.{unknown[0]}: unknown key; valid keys: {', '.join(KEYS)}")
    if (spec.get("name") is None) == (spec.get("path") is None):
        raise QkvError("task.data.dataset: give a name (load_dataset, e.g. {name: imdb, split: train}) or a path "
                       "(a folder written by save_to_disk), not both")
    try:
        import datasets
    except ImportError:
        raise QkvError("task.data.dataset needs the datasets library: pip install 'qkvsearch[hf]'") from None
    try:
        if spec.get("path") is not None:
            data = datasets.load_from_disk(str(spec["path"]))
            if isinstance(data, datasets.DatasetDict):
                data = data[spec.get("split") or "train"]
            return data
        return datasets.load_dataset(spec["name"], spec.get("config"), split=spec.get("split") or "train",
                                     data_files=spec.get("data_files"))
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as error:
        raise QkvError(f"task.data.dataset {spec}: cannot be read ({type(error).__name__}: {error})") from None


def column(data: Any, name: str, field: str) -> None:
    """Raises QkvError naming ``name`` (the setting ``field``) when the dataset lacks that column."""
    if name not in data.column_names:
        raise QkvError(f"task.data.{field}: the dataset has no column {name!r}; columns: {', '.join(data.column_names)}")


def texts(data: Any, text: str) -> Iterator[tuple[str, str]]:
    """``(document id, text)`` per row: the id is the row's index, stable for the same dataset."""
    column(data, text, "text_field")
    for i, value in enumerate(data[text]):
        yield f"row{i}", str(value)


def labelled(data: Any, text: str, label: str) -> list[tuple[str, str]]:
    """``(text, label name)`` per row; a ``ClassLabel`` column gives its names."""
    column(data, text, "text")
    column(data, label, "label")
    names = getattr(data.features[label], "names", None)
    return [(str(t), names[v] if names else str(v)) for t, v in zip(data[text], data[label], strict=True)]


def fingerprint(data: Any) -> str:
    """What the tokenized cache is keyed by: the dataset's Arrow files' contents."""
    digest = hashlib.sha256()
    for cached in sorted(f["filename"] for f in data.cache_files):
        digest.update(pathlib.Path(cached).read_bytes())
    return digest.hexdigest()[:16] if data.cache_files else hashlib.sha256(str(data[:]).encode()).hexdigest()[:16]
