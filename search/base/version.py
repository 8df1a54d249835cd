"""Which code made a study or an export."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """qkvsearch's installed version ('unknown' outside an installation)."""
    try:
        return version("qkvsearch")
    except PackageNotFoundError:
        return "unknown"


def code_version() -> str:
    """qkvsearch's version, and the commit when it runs from a git checkout."""
    found = package_version()
    root = pathlib.Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0 and commit.stdout.strip():
            found += f"+g{commit.stdout.strip()}"
    return found


def versions() -> dict[str, str]:
    """qkvsearch, torch and Python versions, for a model card."""
    import torch

    return {"qkvsearch": package_version(), "torch": torch.__version__, "python": sys.version.split()[0]}
