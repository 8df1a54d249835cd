"""Writing a chosen trial as a folder that runs without qkvsearch, one module per format.

Every format has the same small interface (:class:`Format`): ``write(job, folder)``
writes its files into the folder, checks them, and returns lines saying what it wrote and
how it was checked; a folder's main format (``standalone``, ``hf``) also writes the folder's
model card from those lines. :func:`write_folder` writes into a hidden partial folder
beside the target and renames it into place only when every format passed its checks, so a
failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import uuid
from typing import Any, Protocol

from torch import nn

from qkvsearch.models import ArchConfig
from qkvsearch.models.errors import QkvError


class ExportError(QkvError):
    """The architecture cannot be exported, or the export does not match."""


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where the exported model came from, as its card tells it."""

    study: str
    trial: int
    objectives: list[str]
    values: list[float]
    task: str
    space: str
    code_version: str
    weights: str  # where the weights came from, as :func:`portable` writes it
    test: dict[str, float] = dataclasses.field(default_factory=dict)  # held-out test scores
    finalist: tuple[float, float, int] | None = None  # mean and std of the first objective over seeds, seeds
    duplicate_of: int | None = None
    n_trials: int = 0  # trials the study ran
    baseline: dict[str, Any] | None = None  # the study's reference model and the winner's margin over it


@dataclasses.dataclass
class ExportJob:
    """What every format reads: the architecture, the trained model, where it came from,
    and the text side (its tokenizer and the fresh-process text check) when the task reads text."""

    arch: ArchConfig
    model: nn.Module
    provenance: Provenance
    text: Any = None  # a :class:`~qkvsearch.search.export.text.TextSide`, or None
    notes: list[str] = dataclasses.field(default_factory=list)  # lines for the card (why there is no text side)


class Format(Protocol):
    """One export format."""

    name: str

    def write(self, job: ExportJob, folder: pathlib.Path) -> list[str]:
        """Writes this format's files into ``folder`` and checks them; returns lines for the card.

        Raises:
            ExportError: the architecture cannot be written in this format, or the check failed.
        """
        ...


class MainFormat(Format, Protocol):
    """A format that makes a folder of its own, model card included."""

    def card(self, job: ExportJob, lines: list[str]) -> str:
        """The folder's ``README.md``, with the lines every format returned."""
        ...


def portable(path: pathlib.Path, run_root: str | pathlib.Path) -> str:
    """``path`` as a card shows it: under ``<run_root>/`` or the working folder, never an
    absolute path of the exporting machine."""
    path = pathlib.Path(path).resolve()
    for base, label in ((pathlib.Path(run_root).resolve(), "<run_root>/"), (pathlib.Path.cwd().resolve(), "")):
        if path.is_relative_to(base):
            return label + str(path.relative_to(base))
    return path.name


def write_folder(job: ExportJob, out: pathlib.Path, main: MainFormat, extras: list[Format]) -> pathlib.Path:
    """Writes ``main``'s folder with every extra format's files at ``out``, all checked,
    or nothing at all (an existing ``out`` is replaced only once the new one is whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()  # the user's umask, not mkdtemp's 0700: the folder is meant to be shared
    try:
        lines = main.write(job, partial)
        for extra in extras:
            lines += extra.write(job, partial)
        lines += job.notes
        (partial / "README.md").write_text(main.card(job, lines))
        umask = os.umask(0)
        os.umask(umask)
        for path in partial.rglob("*"):  # safetensors writes 0600; an export is meant to be shared
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
