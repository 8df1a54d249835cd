"""Composing the project's configs from code, inside a Hydra app or outside one."""

from __future__ import annotations

import hashlib
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
                      "storage.heartbeat_s", "storage.grace_s", "max_retries", "study_name")


def multirun_suffix() -> str:
    """In a multirun, ``_`` and this job's overrides (``_seed=1``), so every job gets a study
    of its own unless only worker_index/workers (or paths) differ; nothing in a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    parts = sorted(o for o in HydraConfig.get().overrides.task
                   if not o.lstrip("+~").split("=")[0].startswith(NOT_IN_STUDY_NAMES))
    text = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))
    if len(text) > 80:  # keep names readable and within the limit: a digest of the rest
        text = text[:64] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"_{text}" if text else ""


if not OmegaConf.has_resolver("qkv_multirun_suffix"):
    OmegaConf.register_new_resolver("qkv_multirun_suffix", multirun_suffix)


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Composes ``conf/<name>.yaml`` with ``overrides`` (within the running app's search path
    when one is running, else from the installed ``conf`` package)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=overrides or [])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def run_command(command: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Runs a ``qkv`` command; the project's own errors (:class:`QkvError`: bad input, an
    unusable setting) end with their message and exit status 2 instead of a traceback.
    Anything else is a bug and keeps its traceback. ``QKV_DEBUG=1`` keeps it always."""
    try:
        return command(cfg)
    except QkvError as error:
        if os.environ.get("QKV_DEBUG"):
            raise
        print(f"qkv: error: {error}\n(set QKV_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
