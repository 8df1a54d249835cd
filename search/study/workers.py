"""A worker on a shared study: trial slots, heartbeats, and retries of lost trials.

Every worker, wherever it runs, does the same under the study's slot lock: fail the
trials whose worker stopped beating (Optuna's ``fail_stale_trials``; their retries are
queued), then take a queued retry, or a new trial while the study counts fewer than
``n_trials``, or wait while other workers' trials run, since one of them may die.

What counts towards ``n_trials``: complete, pruned, running and queued trials, and failed
trials that were not retried. A trial that was lost (its worker killed, interrupted or
pre-empted) is failed and queued again with the same parameters, up to ``max_retries``
times, so only genuine failures (the trial's own error, NaN, out of memory) count.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.search.base import signals
from qkvsearch.search.base.keys import (
    BASELINE,
    FAIL_REASON,
    FINALIST_OF,
    FINALIST_SEED,
    RETRY_OF,
    WORKERS_JOINED,
)
from qkvsearch.search.base.signals import backoff
from qkvsearch.search.inspect.selection import counted, frozen
from qkvsearch.search.study.storage import HEARTBEAT_ATTR, is_heartbeat_enabled, slot_lock


class RetryLost(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Queues a lost trial again (same parameters, Optuna's retry lineage), up to
    ``max_retry`` times. The retry starts clean: none of the lost run's results or
    heartbeats, only ``retry_of`` (and a finalist's link to the trial it retrains)."""

    def __init__(self, max_retry: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.copy(trial)
        kept = {k: v for k, v in trial.user_attrs.items() if k in (FINALIST_OF, FINALIST_SEED, BASELINE)}  # stays one
        clean.user_attrs = {RETRY_OF: trial.number, **kept}
        clean.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__call__(study, clean)


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a running trial (Optuna keeps it private: this is its one use;
    the fault tests break if Optuna renames it)."""
    return trial._trial_id


def join_study(study: optuna.Study, pinned: int | None) -> int:
    """This process's worker index: ``pinned`` when the user set one, else the next free
    index of the study (0 for the first process, so a lone run is reproducible). Call it
    under the study's slot lock."""
    joined = int(study.user_attrs.get(WORKERS_JOINED, 0))
    study.set_user_attr(WORKERS_JOINED, joined + 1)
    return joined if pinned is None else int(pinned)


def reap_stale(study: optuna.Study, storage_cfg: Any) -> None:
    """Fails the trials of workers that stopped beating and queues their retries, under the
    slot lock (so each lost trial is retried once, whoever notices it)."""
    with slot_lock(storage_cfg, study.study_name):
        optuna.storages.fail_stale_trials(study)


#: :func:`take_slot`'s answer when other workers' trials run and none may start: look again later
WAIT = "wait"


def take_slot(study: optuna.Study, n_trials: int) -> optuna.Trial | str | None:
    """One look at the study (the caller holds the slot lock): a queued trial (a retry or a
    finalist) first, else a new trial while the study counts fewer than ``n_trials``;
    :data:`WAIT` while other trials run (one may fail and be queued again); None once
    the study is done."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials) or len(counted(trials)) < n_trials:
        return study.ask()
    return WAIT if any(t.state == TrialState.RUNNING for t in trials) else None


def next_trial(study: optuna.Study, storage: BaseStorage, storage_cfg: Any, n_trials: int,
               poll_s: float) -> optuna.Trial | None:
    """Starts the next trial (see :func:`take_slot`), failing dead workers' trials first, or
    returns None once the study is done; waits as :func:`backoff` says while other workers'
    trials run."""
    waits = backoff(poll_s)
    while True:
        signals.check()  # a Ctrl-C between trials stops here, before the study is written to
        with slot_lock(storage_cfg, study.study_name):
            optuna.storages.fail_stale_trials(study)  # under the lock: each lost trial is retried once
            slot = take_slot(study, n_trials)
            if slot != WAIT:
                if slot is not None and is_heartbeat_enabled(storage):
                    storage.record_heartbeat(trial_id(slot))  # type: ignore[attr-defined]
                return slot
        signals.pause(next(waits))


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Records the trial's heartbeat every ``heartbeat_s`` seconds while it runs (nothing on a
    storage without heartbeats, such as the in-memory one a replay uses)."""
    if not is_heartbeat_enabled(storage):
        yield
        return
    interval = storage.get_heartbeat_interval()  # type: ignore[attr-defined]
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.record_heartbeat(trial_id(trial))  # type: ignore[attr-defined]

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def record_interrupted(study: optuna.Study, trial: optuna.Trial, reason: str, retry: RetryLost) -> None:
    """Fails an interrupted trial and queues its retry, deaf to further signals meanwhile
    (a second Ctrl-C must not cut the record short)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    trial.set_user_attr(FAIL_REASON, f"interrupted ({reason}); queued again for the next worker")
    study.tell(trial, state=TrialState.FAIL)
    retry(study, frozen(study, trial.number))
