"""Search spaces: an Optuna trial in, a checked architecture config out.

Depends on models and optuna only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from qkvsearch.models import ArchConfig
from qkvsearch.spaces.expressions import Expression, ExpressionError
from qkvsearch.spaces.loading import load_space_dict
from qkvsearch.spaces.schema import Infeasible, SpaceError
from qkvsearch.spaces.space import (
    Lacking,
    Recorder,
    Space,
    ValuesTrial,
    outside,
    record_constraints,
    record_one_by_one,
    render,
)

__all__ = [
    "Expression",
    "ExpressionError",
    "FunctionSpace",
    "Infeasible",
    "Lacking",
    "Space",
    "SpaceError",
    "ValuesTrial",
    "load_space",
    "outside",
    "Recorder",
    "record_constraints",
    "record_one_by_one",
    "render",
]


class FunctionSpace:
    """A space written in Python: ``fn(trial, cfg) -> ArchConfig`` named by ``_target_``."""

    def __init__(self, name: str, fn: Callable[[optuna.Trial, Any], ArchConfig], cfg: Any) -> None:
        self.name, self.fn, self.cfg = name, fn, cfg
        self.description = (fn.__doc__ or "").strip()
        self.constraint_names = ["valid"]

    def suggest(self, trial: optuna.Trial, write: Recorder = record_one_by_one) -> ArchConfig:
        """Calls the function; a ValueError from it (a bad architecture) prunes the trial.
        What it records goes through ``write``, as :meth:`Space.suggest`'s does."""
        try:
            arch = self.fn(trial, self.cfg)
        except ValueError as error:
            write(trial, {"valid": 1.0}, {"pruned_reason": f"infeasible: {error}"})
            raise Infeasible(str(error)) from None
        if not isinstance(arch, ArchConfig):
            raise SpaceError(f"space function {self.name} must return an ArchConfig, got {type(arch).__name__}")
        write(trial, {"valid": 0.0}, {})
        return arch

    def describe(self) -> list[tuple[str, str, str]]:
        return [(self.name, "python function", self.description.splitlines()[0] if self.description else "")]


def load_space(data: Mapping[str, Any], cfg: Any = None, source: str = "space") -> Space | FunctionSpace:
    """Loads a space from its config: a declarative mapping, or ``{_target_: module.function}``.

    Raises:
        SpaceError: the space is malformed; the message names ``source`` and the key.
    """
    if isinstance(data, Mapping) and "_target_" in data:
        target = data["_target_"]
        module_name, _, attr = str(target).rpartition(".")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as error:
            raise SpaceError(f"{source}: _target_: cannot import {target!r}: {error}") from None
        return FunctionSpace(str(data.get("name", target)), fn, cfg)
    return load_space_dict(data, source)
