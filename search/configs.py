"""Composing the project's configs from code, inside a Hydra app or outside one."""

from __future__ import annotations

import pathlib

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import conf

CONF_DIR = str(pathlib.Path(conf.__file__).resolve().parent)


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Composes ``conf/<name>.yaml`` with ``overrides`` (within the running app's search path
    when one is running, else from the installed ``conf`` package)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=overrides or [])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])
