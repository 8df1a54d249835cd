"""``qkv sweep``'s entry point. It checks the settings and starts the extra workers before
it imports torch and Lightning (several CPU-seconds), so every worker imports at the same
time instead of the extra ones starting only after the first has imported everything."""

from __future__ import annotations

import logging
import time

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qkvsearch.search.base.configs import run_command
from qkvsearch.search.study.group import start_workers

log = logging.getLogger(__name__)


class JobLogs(Callback):
    """Says where a submitit multirun's jobs write their logs, as the jobs are submitted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        folder = OmegaConf.select(config, "hydra.launcher.submitit_folder", default=None)
        if folder:
            print(f"each job's log: {folder.replace('%j', '<job id>')}/<job id>_0_log.out", flush=True)


def run(cfg: DictConfig) -> None:
    started = time.perf_counter()
    group = start_workers(cfg)
    try:
        from qkvsearch.search.study.sweep import sweep
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
