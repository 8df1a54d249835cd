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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.search import signals
from qkvsearch.search.inspect.finalists import FINALIST_OF, FINALIST_SEED, is_finalist
from qkvsearch.search.study.storage import HEARTBEAT_ATTR, slot_lock

#: User attribute of a retry: the number of the lost trial it runs again.
RETRY_OF = "retry_of"
#: Study user attribute counting the processes that have joined the study.
WORKERS_JOINED = "workers_joined"


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
        kept = {k: v for k, v in trial.user_attrs.items() if k in (FINALIST_OF, FINALIST_SEED)}  # a finalist stays one
        clean.user_attrs = {RETRY_OF: trial.number, **kept}
        clean.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__call__(study, clean)


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a running trial (Optuna keeps it private: this is its one use;
    the fault tests break if Optuna renames it)."""
    return trial._trial_id


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that have a retry queued, running or finished."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards ``n_trials`` (see the module docstring); the retrainings
    of finalists do not."""
    retried = retried_numbers(trials)
    return [t for t in trials if (t.state != TrialState.FAIL or t.number not in retried) and not is_finalist(t)]


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


def backoff(most: float, first: float = 0.5) -> Iterator[float]:
    """Waits between looks at the study: ``first`` seconds, then twice as long each time up
    to ``most``. A wait that ends soon ends within a second; a long one costs the storage
    one read per ``most`` seconds."""
    wait = min(first, most)
    while True:
        yield wait
        wait = min(2 * wait, most)


def next_trial(study: optuna.Study, storage: BaseStorage, storage_cfg: Any, n_trials: int,
               poll_s: float) -> optuna.Trial | None:
    """Starts the next trial (a queued retry first), or returns None once the study holds
    ``n_trials`` counted trials and none runs. Waits while other workers' trials run (one of
    them may fail and be queued again), looking again as :func:`backoff` says."""
    waits = backoff(poll_s)
    while True:
        signals.check()  # a Ctrl-C between trials stops here, before the study is written to
        with slot_lock(storage_cfg, study.study_name):
            optuna.storages.fail_stale_trials(study)  # under the lock: each lost trial is retried once
            trials = study.get_trials(deepcopy=False)
            if any(t.state == TrialState.WAITING for t in trials) or len(counted(trials)) < n_trials:
                trial = study.ask()
                storage.record_heartbeat(trial_id(trial))  # type: ignore[attr-defined]
                return trial
            if not any(t.state == TrialState.RUNNING for t in trials):
                return None
        signals.pause(next(waits))


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Records the trial's heartbeat every ``heartbeat_s`` seconds while it runs."""
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


def frozen(study: optuna.Study, number: int) -> FrozenTrial:
    """The stored state of trial ``number``."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def record_interrupted(study: optuna.Study, trial: optuna.Trial, reason: str, retry: RetryLost) -> None:
    """Fails an interrupted trial and queues its retry, deaf to further signals meanwhile
    (a second Ctrl-C must not cut the record short)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    trial.set_user_attr("fail_reason", f"interrupted ({reason}); queued again for the next worker")
    study.tell(trial, state=TrialState.FAIL)
    retry(study, frozen(study, trial.number))


def wait_for_twin(study: optuna.Study, trial: optuna.Trial, key: str, poll_s: float,
                  reap: Callable[[], None]) -> FrozenTrial | None:
    """Waits while an earlier trial of the same candidate (``candidate_hash``) runs on another worker
    (``reap`` fails it if that worker dies); returns it once finished (None when there is none)."""
    twin = None
    waits = backoff(poll_s)
    while True:
        if twin is not None:
            reap()
        running = [
            t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number < trial.number and t.user_attrs.get("candidate_hash", t.user_attrs.get("arch_hash")) == key
        ]
        if not running:
            return None if twin is None else frozen(study, twin)
        if twin is None:  # recorded once (an earlier check read 'waited_for: 0' as unset and wrote it every poll)
            trial.set_user_attr("waited_for", running[0].number)
        twin = running[0].number
        signals.pause(next(waits))
