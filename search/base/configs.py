"""Composing the project's configs from code, inside a Hydra app or outside one."""

from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qkvsearch import conf
from qkvsearch.models.errors import QkvError

CONF_DIR = str(pathlib.Path(conf.__file__).resolve().parent)
#: Overrides that never name a study: they exist to share one (worker_index, workers) or
#: say where things are kept.
NOT_IN_STUDY_NAMES = ("worker_index", "workers", "gpus", "trials_per_gpu", "run_root", "artifacts", "storage.url",
                      "storage.path",
                      "storage.heartbeat_s", "storage.grace_s", "max_retries", "study_name", "plugins")


def job_overrides() -> list[str]:
    """The overrides that make this multirun job a study of its own (sorted), leaving out
    those that exist to share a study (worker_index, workers) or say where things are kept;
    empty outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    return sorted(o for o in HydraConfig.get().overrides.task
                  if not o.lstrip("+~").split("=")[0].startswith(NOT_IN_STUDY_NAMES))


def multirun_suffix() -> str:
    """In a multirun, ``-`` and a short digest of this job's overrides (``-3f9a1c2b``), so every
    job gets a study of its own (the same one when run again) unless only worker_index or
    workers differ, under a name that pastes back into a command line as printed; the
    overrides themselves are kept as the study's ``overrides`` attribute. Nothing in a single run."""
    parts = job_overrides()
    return "-" + hashlib.sha256(",".join(parts).encode()).hexdigest()[:8] if parts else ""


def steps_times(steps: int, factor: int) -> int:
    """``steps * factor`` (``${qkv_times:${trainer.val_check_interval},2}`` in a config)."""
    return int(steps) * int(factor)


if not OmegaConf.has_resolver("qkv_multirun_suffix"):
    OmegaConf.register_new_resolver("qkv_multirun_suffix", multirun_suffix)
if not OmegaConf.has_resolver("qkv_times"):
    OmegaConf.register_new_resolver("qkv_times", steps_times)


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Composes ``conf/<name>.yaml`` with ``overrides`` (within the running app's search path
    when one is running, else from the installed ``conf`` package)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=overrides or [])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def import_plugins(names: Any) -> None:
    """Imports the user's own modules listed in ``plugins`` (the working directory first on
    the path), before anything is built: their components register themselves and their
    classes are found by ``_target_``, with no PYTHONPATH to set.

    Raises:
        QkvError: an entry that is not a module name, or a module that does not import.
    """
    if not names:
        return
    if isinstance(names, str):
        names = [names]
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            raise QkvError(f"plugins: entries are module names (mycomponents, mypackage.data), got {name!r}")
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise QkvError(f"plugins: cannot import {name!r} ({error}); a plugin is a module importable from the "
                           f"working directory ({cwd}) or the Python path") from None


def run_command(command: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Runs a ``qkv`` command; the project's own errors (:class:`QkvError`: bad input, an
    unusable setting) end with their message and exit status 2 instead of a traceback.
    Anything else is a bug and keeps its traceback. ``QKV_DEBUG=1`` keeps it always."""
    try:
        import_plugins(cfg.get("plugins"))
        return command(cfg)
    except QkvError as error:
        if os.environ.get("QKV_DEBUG"):
            raise
        print(f"qkv: error: {error}\n(set QKV_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
