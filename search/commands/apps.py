"""The Hydra apps of ``qkv export``, ``report``, ``dashboard``, ``space show`` and ``train``.

Each command's module imports torch, Lightning and the export libraries (several CPU-seconds,
more on a loaded machine), so it is imported only once Hydra has composed the config and the
command is about to run: ``--cfg job``, ``--help`` and a config error answer without them.
"""

from __future__ import annotations

import importlib
from typing import Any

import hydra
from omegaconf import DictConfig

from qkvsearch.search.base.configs import run_command


def _command(module: str, name: str) -> Any:
    return getattr(importlib.import_module(f"qkvsearch.search.commands.{module}"), name)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def export(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv export``."""
    out = run_command(lambda c: _command("export", "export")(c), cfg)
    print(f"exported to {out} (checked in a fresh process without qkvsearch)")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="report")
def report(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv report``."""
    out = run_command(lambda c: _command("report", "report")(c), cfg)
    print(f"report written to {out} (self-contained: open it in any browser, offline)")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="dashboard")
def dashboard(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv dashboard``."""
    run_command(lambda c: _command("dashboard", "serve")(c), cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="space_show")
def space(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv space show``."""
    run_command(lambda c: _command("space", "show")(c), cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def train(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv train``."""
    run_command(lambda c: _command("train", "train")(c), cfg)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="storage_proxy")
def storage_proxy(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv storage-proxy``."""
    run_command(lambda c: _command("proxy", "serve")(c), cfg)
