"""The Hydra apps of ``qkv export``, ``report``, ``dashboard``, ``space show`` and ``train``.

Each command's module imports torch, Lightning and the export libraries (several CPU-seconds,
more on a loaded machine), so it is imported only once Hydra has composed the config and the
command is about to run: ``--cfg job``, ``--help`` and a config error answer without them.
Before that import, each command makes the checks that need only the storage (the study is
there, the storage opens): a mistyped study name is one line in about a second, not ten.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from qkvsearch.search.base.configs import run_command


def _command(module: str, name: str, check: Callable[[DictConfig], Any] | None = None,
             ) -> Callable[[DictConfig], Any]:
    """The command function ``name`` of ``qkvsearch.search.commands.<module>``, imported when
    called, after ``check``: the light checks that can refuse the input before that import.
    What ``check`` opened (the study, the storage) is handed to the command, not opened again."""

    def command(cfg: DictConfig) -> Any:
        opened = check(cfg) if check is not None else None
        run = getattr(importlib.import_module(f"qkvsearch.search.commands.{module}"), name)
        return run(cfg) if opened is None else run(cfg, opened)

    return command


def _study(cfg: DictConfig) -> Any:
    from qkvsearch.search.study.storage import load_named_study  # optuna and SQLAlchemy: not for --cfg/--help

    return load_named_study(cfg.storage, cfg.study_name)


def _storage(cfg: DictConfig) -> Any:
    from qkvsearch.search.study.storage import open_storage

    return open_storage(cfg.storage, must_exist=True)


def _train_source(cfg: DictConfig) -> Any:
    from qkvsearch.search.base.settings import check_one_source

    check_one_source(cfg.arch, cfg.study_name)
    return _study(cfg) if cfg.study_name is not None else None


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def export(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv export``."""
    out = run_command(_command("export", "export", _study), cfg)
    print(f"exported to {out} (checked in a fresh process without qkvsearch)")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="report")
def report(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv report``."""
    out = run_command(_command("report", "report", _study), cfg)
    print(f"report written to {out} (self-contained: open it in any browser, offline)")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="dashboard")
def dashboard(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv dashboard``."""
    run_command(_command("dashboard", "serve", _storage), cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="space_show")
def space(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv space show``."""
    run_command(_command("space", "show"), cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def train(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv train``."""
    run_command(_command("train", "train", _train_source), cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="storage_proxy")
def storage_proxy(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv storage-proxy``."""
    run_command(_command("proxy", "serve"), cfg)
