"""Lightning's import without the parts of torchmetrics no trial uses.

Importing Lightning imports torchmetrics (Lightning reads its version by importing it,
and ``lightning.pytorch`` logs its ``Metric`` objects). torchmetrics in turn imports
``scipy.signal`` at its top (a compatibility patch for an audio package) and, for
BERTScore, ``transformers``, whenever they are installed: about 3.5 of a worker's 10
CPU-seconds of imports on our 2-core machine (benchmarks/startup.py), paid by every worker,
every SLURM array task and every subprocess of the test suite. Lightning's own issue on it
was closed as a third-party matter (Lightning-AI/pytorch-lightning#19261).

:func:`install` puts a finder first on ``sys.meta_path`` that, while ``torchmetrics``
itself executes, and only then, answers those two imports with placeholders; then it takes
them out of ``sys.modules`` again, so a later ``import transformers`` or ``import
scipy.signal`` (the Hugging Face export, ``scipy.stats`` in the report) gets the real
module. What torchmetrics bound to a placeholder is its BERTScore, CLIPScore and InfoLM,
which raise ImportError if called; nothing in qkvsearch calls them. If torchmetrics fails
to import with the placeholders (a version that imports more of them), the attempt is
undone and torchmetrics imports as it would have. ``QKV_FULL_IMPORTS=1`` turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

#: the module whose execution is made lean, and what it is spared while it executes
TARGET = "torchmetrics"
SPARED = ("transformers", "scipy.signal")
#: the environment variable that turns the finder off
OFF = "QKV_FULL_IMPORTS"


class _Absent:
    """What a placeholder module hands out for any name: using it raises ImportError."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _refuse(self) -> ImportError:
        return ImportError(f"{self._name} was left out of torchmetrics' import by qkvsearch "
                           f"(qkvsearch.search.base.lean_imports); set {OFF}=1 to import it whole")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse()

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise self._refuse()


def _placeholder(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "placeholder of qkvsearch.search.base.lean_imports")
    module.__path__ = []
    module.__getattr__ = lambda attr: _Absent(f"{name}.{attr}")  # type: ignore[method-assign]
    return module


class _LeanLoader(importlib.abc.Loader):
    """The target's own loader, run with placeholders for ``spared`` in ``sys.modules``."""

    def __init__(self, real: importlib.abc.Loader, target: str, spared: Sequence[str]) -> None:
        self.real, self.target, self.spared = real, target, tuple(spared)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        placed = {name: _placeholder(name) for name in self.spared if name not in sys.modules}
        before = set(sys.modules)
        sys.modules.update(placed)
        try:
            self.real.exec_module(module)
        except Exception:  # noqa: BLE001 - a target that needs more than a placeholder: import it whole
            self._remove(placed)
            for name in set(sys.modules) - before:
                if name.startswith(f"{self.target}."):
                    del sys.modules[name]
            self.real.exec_module(module)
        finally:
            self._remove(placed)

    @staticmethod
    def _remove(placed: dict[str, types.ModuleType]) -> None:
        for name, stub in placed.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]
            parent, _, child = name.rpartition(".")
            # vars(), not getattr: a package's lazy __getattr__ would import the real module here
            if parent and vars(sys.modules.get(parent, types)).get(child) is stub:
                delattr(sys.modules[parent], child)


class LeanFinder(importlib.abc.MetaPathFinder):
    """Finds ``target`` as the rest of ``sys.meta_path`` would, with a lean loader; once."""

    def __init__(self, target: str = TARGET, spared: Sequence[str] = SPARED) -> None:
        self.target, self.spared = target, tuple(spared)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.target:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]  # one import, then out of the way
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LeanLoader(spec.loader, self.target, self.spared)
        return spec


def install(target: str = TARGET, spared: Sequence[str] = SPARED) -> bool:
    """Puts a :class:`LeanFinder` first on ``sys.meta_path``, unless ``target`` is imported
    already, ``QKV_FULL_IMPORTS`` is set, or one is there; True when one is there after."""
    if os.environ.get(OFF, "") not in ("", "0") or target in sys.modules:
        return False
    if not any(isinstance(f, LeanFinder) and f.target == target for f in sys.meta_path):
        sys.meta_path.insert(0, LeanFinder(target, spared))
    return True
