"""Shared fixtures: the real conf/ composed with Hydra, cut down for tests."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import qkvsearch.search.base.configs  # noqa: F401 - registers the resolvers the configs use

CONF = str(pathlib.Path(__file__).resolve().parent.parent / "conf")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
#: Sweeps in tests run no finalists and no baseline (each adds full trials) unless a test asks:
#: compose_conf puts this first (a test's own ``finalists=2`` wins), a process's command
#: line ends with it (after Hydra's flags, which must come before overrides).
TEST_SWEEP = ["finalists=0", "baseline=false"]
#: ``qkv sweep`` as a test starts it in a process of its own: ``[*SWEEP_CMD, *args, *TEST_SWEEP]``.
SWEEP_CMD = [sys.executable, "-m", "qkvsearch.search.cli", "sweep"]


def compose_conf(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Composes ``conf/<config_name>.yaml`` with overrides, as the command line would."""
    defaults = TEST_SWEEP if config_name == "sweep" else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=[*defaults, *(overrides or [])], return_hydra_config=False)


def tiny_sweep_conf(tmp_path: pathlib.Path, *overrides: str) -> DictConfig:
    """A sweep config cut down to seconds: small task, short trials, storage in tmp_path."""
    return compose_conf(
        "sweep",
        [
            "task=recall",
            "task.data.n_train=512",
            "task.data.n_val=128",
            "task.data.n_pairs=4",
            "trainer.max_steps=30",
            "trainer.val_check_interval=10",
            "trainer.limit_val_batches=2",
            f"run_root={tmp_path}",
            "n_trials=3",
            *overrides,
        ],
    )


@pytest.fixture
def compose_config():
    return compose_conf


@pytest.fixture(scope="session")
def slurm_env():
    """A real one-node SLURM cluster: the environment variables that reach it."""
    from tests.search.slurm import slurm_cluster

    yield from slurm_cluster()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 (QKV_TEST_POSTGRES_URL, or a throwaway cluster)."""
    from tests.search.postgres import postgres_cluster

    yield from postgres_cluster()
