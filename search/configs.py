"""Composing the project's configs from code, inside a Hydra app or outside one."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from qkvsearch import conf
from qkvsearch.models.errors import QkvError

CONF_DIR = str(pathlib.Path(conf.__file__).resolve().parent)


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
