"""``qkv sweep`` as a pipeline of stages: prepare -> search -> baseline -> finalists -> test scores -> summary.

Every worker prepares (checks the config, opens the study) and searches; the first
process, once every worker is done, also trains the space's reference configuration (the
baseline), runs the finalists, scores the best trials and the baseline on the held-out
test split and prints the summary. A signal stops a stage between training
steps and storage writes, never inside one (``base/signals.py``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator

import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qkvsearch.search.base import signals
from qkvsearch.search.base.env import SPAWNED_BY
from qkvsearch.search.base.errors import Interrupted
from qkvsearch.search.base.settings import threads_per_worker
from qkvsearch.search.inspect.report_text import print_summary
from qkvsearch.search.study.baseline import run_baseline
from qkvsearch.search.study.finalists import run_finalists
from qkvsearch.search.study.group import WorkerGroup, start_workers
from qkvsearch.search.study.prepare import prepare
from qkvsearch.search.study.search import run_worker
from qkvsearch.search.study.storage import storage_url
from qkvsearch.search.trial.evaluate import record_test_scores
from qkvsearch.search.trial.lit import quiet_lightning


@contextlib.contextmanager
def stage(study_name: str, what: str, group: WorkerGroup | None = None) -> Iterator[None]:
    """Runs a stage where a signal waits for a safe point; an interrupt stops the extra
    workers and says how to resume."""
    try:
        with signals.deferred():
            yield
    except (Interrupted, KeyboardInterrupt):
        if group:
            group.interrupt()
        print(f"interrupted: the running {what} is failed and queued again; run the same command to resume "
              f"{study_name!r}", file=sys.stderr)
        raise
    except BaseException:
        if group:
            group.interrupt()
        raise


def next_commands(cfg: DictConfig) -> list[str]:
    """The overrides that point ``qkv dashboard``, ``report`` and ``export`` at this sweep's storage."""
    extra = [f"study_name={cfg.study_name}"]
    if HydraConfig.initialized():
        storage = HydraConfig.get().runtime.choices.get("storage")
        if storage and storage != "sqlite":
            extra.append(f"storage={storage}")
    if cfg.run_root != "runs":
        extra.append(f"run_root={cfg.run_root}")
    return [shlex.quote(arg) for arg in extra]  # pastes into a shell as printed


def sweep(cfg: DictConfig, group: WorkerGroup | None = None, started: bool = False) -> optuna.Study:
    """Runs the sweep ``cfg`` describes and returns the study; ``started``: the caller ran
    :func:`start_workers` already (``group`` is what it returned)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_lightning()
    first = SPAWNED_BY not in os.environ
    objectives = list(cfg.objectives)
    with stage(cfg.study_name, "trial", group):
        if not started:
            group = start_workers(cfg)
        torch.set_num_threads(threads_per_worker(cfg))
        prepared = prepare(cfg)  # checks the settings (an extra worker's too) before it builds
        worker = prepared.worker
        if first:
            print(f"study {cfg.study_name!r} in {storage_url(cfg.storage)}; trials under {prepared.run_dir}", flush=True)
            if group:
                print(f"{len(group.procs)} more workers, logs in {group.log_dir}", flush=True)
        run_worker(worker, cfg.n_trials, objectives, live=first and worker.index == 0 and sys.stdout.isatty())
    if group:
        group.wait()
    if first:
        with stage(cfg.study_name, "baseline or finalist"):
            run_baseline(worker, prepared.reference, 1 + (cfg.finalist_seeds if cfg.finalists else 0), objectives)
            run_finalists(worker, cfg.finalists, cfg.finalist_seeds, objectives)
        record_test_scores(worker.study, prepared.task, cfg.run_root)  # selected on validation, reported on test
        print_summary(worker.study, next_commands(cfg))
    return worker.study
