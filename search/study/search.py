"""The sweep's search stage: a worker takes trials from the study and runs them until the
study holds ``n_trials`` and none is queued or running."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from typing import Any

import optuna
import torch

from qkvsearch.search.base.env import VISIBLE
from qkvsearch.search.base.errors import Interrupted
from qkvsearch.search.base.keys import FAIL_REASON, LOST, PRUNED_REASON, TRACEBACK
from qkvsearch.search.base.records import record
from qkvsearch.search.inspect.selection import frozen
from qkvsearch.search.study.prepare import Worker
from qkvsearch.search.study.progress import print_trial
from qkvsearch.search.study.workers import heartbeat, next_trial, record_interrupted
from qkvsearch.search.trial.lit import NonFiniteLoss

log = logging.getLogger("qkvsearch")
State = optuna.trial.TrialState


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None = None,
         state: optuna.trial.TrialState | None = None) -> None:
    """Tells the study a result; a trial another worker already failed (its heartbeat
    went stale, so its retry is queued) is left as it is (Optuna raises ValueError for
    it otherwise, or UpdateFinishedTrialError when the other worker's write comes between
    its read and its write)."""
    try:
        told = study.tell(trial, values, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        told = frozen(study, trial.number)
    except RuntimeError as error:
        # Optuna's GridSampler asks the study to stop when its grid is used up, which raises
        # outside Study.optimize (after the result is stored); the workers stop by the counts
        if "Study.stop" not in str(error):
            raise
        return
    if str(told.user_attrs.get(FAIL_REASON, "")).startswith(LOST):
        log.warning("trial %d was failed by another worker while it ran (heartbeats late?); its retry runs instead",
                    trial.number)


def ended(trial: optuna.Trial, start: float, facts: dict[str, Any] | None = None) -> None:
    """Records the trial's wall time and what its end says (why it was pruned or failed) in
    one write; nothing when another worker already failed the trial."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        record(trial, {"wall_time_s": time.perf_counter() - start, **(facts or {})})


def placement(index: int) -> dict[str, Any]:
    """Where a trial runs: host and pid, worker index, its GPU and its SLURM job."""
    facts: dict[str, Any] = {"worker": f"{socket.gethostname()}:{os.getpid()}", "worker_index": index}
    if VISIBLE in os.environ:
        facts["cuda_visible_devices"] = os.environ[VISIBLE]
    if "SLURM_JOB_ID" in os.environ:  # as squeue and scancel name it (an array's task: 12_3); submitit's log folder too
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        facts["slurm_job_id"] = "_".join(array) if all(array) else os.environ["SLURM_JOB_ID"]
    return facts


def run_trial(worker: Worker, trial: optuna.Trial) -> None:
    """Runs one trial and tells the study how it ended; only an interrupt propagates."""
    if "worker" not in trial.user_attrs:  # a trial next_trial took was written with it
        record(trial, placement(worker.index))
    start = time.perf_counter()
    try:
        with heartbeat(worker.storage, trial, worker.storage_cfg.heartbeat_s if worker.storage_cfg else None):
            values = worker.objective(trial)
    except optuna.TrialPruned as error:
        ended(trial, start, {PRUNED_REASON: trial.user_attrs.get(PRUNED_REASON) or str(error) or "pruned"})
        tell(worker.study, trial, state=State.PRUNED)
    except NonFiniteLoss as error:
        ended(trial, start, {PRUNED_REASON: f"non-finite loss: {error}"})
        tell(worker.study, trial, state=State.PRUNED)
    except torch.OutOfMemoryError as error:
        ended(trial, start, {PRUNED_REASON: f"out of memory: {str(error).splitlines()[0]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tell(worker.study, trial, state=State.PRUNED)
    except (Interrupted, KeyboardInterrupt, SystemExit) as error:
        ended(trial, start)
        record_interrupted(worker.study, trial, str(error) or type(error).__name__, worker.retry)
        raise
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was failed by another worker while it ran; its retry runs instead", trial.number)
    except Exception as error:  # noqa: BLE001 - any error of one trial must not stop the study
        ended(trial, start, {FAIL_REASON: f"{type(error).__name__}: {error}"[:2000],
                             TRACEBACK: traceback.format_exc()[-4000:]})
        tell(worker.study, trial, state=State.FAIL)
    else:
        ended(trial, start)
        tell(worker.study, trial, values)


def run_worker(worker: Worker, n_trials: int, objectives: list[str], live: bool = False) -> None:
    """Runs trials until the study holds ``n_trials`` counted trials, none is queued and
    none runs; prints a line per finished trial, and with ``live`` the counts and the
    current trial (``n_trials=0``: only the queued trials, a finalist's or a retry)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with Live(worker.view, console=console, refresh_per_second=2, transient=True) if live else contextlib.nullcontext():
        while (trial := next_trial(worker.study, worker.storage, worker.storage_cfg, n_trials, worker.retry,
                                     placement(worker.index))) is not None:
            run_trial(worker, trial)
            print_trial(console, frozen(worker.study, trial.number), objectives)
            worker.view.current = {}
