"""``qkv sweep``'s entry point. It checks the settings and starts the extra workers before
it imports torch and Lightning (several CPU-seconds), so every worker imports at the same
time instead of the extra ones starting only after the first has imported everything."""

from __future__ import annotations

import logging
import os
import time

import hydra
from omegaconf import DictConfig

from qkvsearch.search.configs import run_command
from qkvsearch.search.study.devices import VISIBLE, plan_workers
from qkvsearch.search.study.group import SPAWNED_BY, WorkerGroup
from qkvsearch.search.study.settings import check_sweep

log = logging.getLogger(__name__)


def start_workers(cfg: DictConfig) -> WorkerGroup | None:
    """In the first process: resolves ``workers``/``gpus``, pins this process to its GPU,
    checks the settings and starts the extra workers (each pinned to its own). Nothing in
    an extra worker."""
    if SPAWNED_BY in os.environ:
        return None
    plan = plan_workers(cfg)
    cfg.workers = plan.workers
    if plan.devices[0] is not None:  # before anything initialises CUDA in this process
        os.environ[VISIBLE] = plan.devices[0]
    check_sweep(cfg)
    return WorkerGroup.start(cfg, plan.devices) if plan.workers > 1 else None


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    group = start_workers(cfg)
    try:
        from qkvsearch.search.study.run import sweep
    except BaseException:
        if group:
            group.interrupt()
        raise
    sweep(cfg, group=group, started=True)
    log.info("sweep took %.1f s", time.perf_counter() - started)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv sweep``."""
    run_command(run, cfg)
