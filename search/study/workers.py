"""A worker on a shared study: trial slots, heartbeats, and retries of lost trials.

Every worker, wherever it runs, does the same under the study's slot lock: fail the
trials whose worker went silent (:func:`reap_lost`: no heartbeat, or none at all, for
``grace_s`` seconds; the reason and the retry's number are recorded on the failed trial,
and the retry is queued), then take a queued retry, or a new trial while the study counts
fewer than ``n_trials``, or wait while other workers' trials run, since one of them may die.

A heartbeat is the trial system attribute ``qkv:heartbeat`` (the writer's wall-clock time),
the same on SQLite, PostgreSQL and journal files: machines that share a study need clocks
within a small part of the grace of each other (NTP gives milliseconds).

What counts towards ``n_trials``: complete, pruned, running and queued trials, and failed
trials that were not retried. A trial that was lost (its worker killed, interrupted or
pre-empted) is failed and queued again with every parameter it had sampled (one it had not
sampled yet is drawn anew when the retry runs), up to ``max_retries`` times, so only genuine
failures (the trial's own error, NaN, out of memory) count.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.search.base import signals
from qkvsearch.search.base.errors import StorageUnreachable
from qkvsearch.search.base.keys import (
    BASELINE,
    FAIL_REASON,
    FINALIST_OF,
    FINALIST_SEED,
    LOST,
    RETRY_OF,
    WORKERS_JOINED,
    pinned,
)
from qkvsearch.search.base.records import record
from qkvsearch.search.base.signals import backoff
from qkvsearch.search.study.storage import CONSTRAINTS_PREFIX, HEARTBEAT_ATTR, slot_lock
from qkvsearch.search.study.tally import (
    Counts,
    database_counts,
    open_trials,
    running_trials,
    trial_count,
    trial_id,
)


class RetryLost(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Queues a lost trial again (same parameters, Optuna's retry lineage), up to
    ``max_retry`` times. The retry starts clean: none of the lost run's results, heartbeats
    or constraint values (its own sampling records them again), only ``retry_of`` (and a
    finalist's or baseline's link)."""

    def __init__(self, max_retry: int) -> None:
        self.max_retry = max_retry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=max_retry)

    def will_retry(self, trial: FrozenTrial) -> bool:
        """Whether ``trial``, once failed, gets a retry (it has not used up ``max_retry``)."""
        return len(trial.system_attrs.get("retry_history", ())) < self.max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.copy(trial)
        kept = {k: v for k, v in trial.user_attrs.items() if k in (FINALIST_OF, FINALIST_SEED, BASELINE)}  # stays one
        clean.user_attrs = {RETRY_OF: trial.number, **kept}
        clean.system_attrs = {k: v for k, v in trial.system_attrs.items()
                              if k != HEARTBEAT_ATTR and not k.startswith(CONSTRAINTS_PREFIX)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__call__(study, clean)


def join_study(study: optuna.Study, pinned: int | None) -> int:
    """This process's worker index: ``pinned`` when the user set one, else the next free
    index of the study (0 for the first process, so a lone run is reproducible). Call it
    under the study's slot lock."""
    joined = int(study.user_attrs.get(WORKERS_JOINED, 0))
    study.set_user_attr(WORKERS_JOINED, joined + 1)
    return joined if pinned is None else int(pinned)


def reap_lost(study: optuna.Study, storage: BaseStorage, grace_s: float, retry: RetryLost) -> list[int]:
    """Fails each running trial silent for more than ``grace_s`` seconds (its last heartbeat,
    or its start where it never beat: a worker killed between taking the trial and its first
    heartbeat), recording why and which trial retries it, and queues the retry. The caller
    holds the slot lock (so each lost trial is failed and retried once, whoever notices it,
    and the retry's number is the next one). Returns the numbers of the trials it failed."""
    now, failed = time.time(), []
    if now - getattr(storage, "recovered_at", 0.0) < grace_s:
        return failed  # right after an outage: every worker needs a grace to beat again
    for running in running_trials(study, storage):
        last = running.heartbeat if running.heartbeat is not None else running.started
        if last is None or now - float(last) <= grace_s:
            continue
        ident = running.trial_id
        fate = (f"retried as trial {trial_count(study, storage)}" if retry.will_retry(storage.get_trial(ident))
                else f"not retried: max_retries ({retry.max_retry}) reached")
        silent = "no heartbeat" if running.heartbeat is not None else "no heartbeat ever"
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(ident, FAIL_REASON,
                                        f"{LOST}: {silent} for {now - float(last):.0f} s (grace {grace_s:g} s); {fate}")
            if storage.set_trial_state_values(ident, state=TrialState.FAIL):
                failed.append(running.number)
                retry(study, storage.get_trial(ident))
    return failed


def reap_stale(study: optuna.Study, storage: BaseStorage, storage_cfg: Any, retry: RetryLost) -> None:
    """:func:`reap_lost` under the study's slot lock, with the storage's grace."""
    with slot_lock(storage_cfg, study.study_name):
        reap_lost(study, storage, float(storage_cfg.grace_s), retry)


#: :func:`take_slot`'s answer when other workers' trials run and none may start: look again later
WAIT = "wait"


class Tally:
    """What counts towards ``n_trials`` (:func:`~qkvsearch.search.inspect.selection.counted`),
    kept up to date from the trials that can still change: a finished trial never does,
    so each is looked at once, and a look costs the trials since the oldest unfinished one,
    not every trial ever run. One per study object (:func:`tally_of`)."""

    def __init__(self) -> None:
        self.settled = 0  # every trial before this position is finished and tallied
        self.finished: set[int] = set()  # numbers of the finished trials tallied
        self.finished_counted = 0  # finished, neither a finalist's nor a baseline's
        self.failed: set[int] = set()  # failed search trials (they count unless retried)
        self.retried: set[int] = set()  # failed trials with a retry (from each trial's retry_history)
        self.open_counted = 0  # running or queued search trials, at the last look
        self.waiting = self.running = False

    def update(self, trials: list[FrozenTrial]) -> Tally:
        """Brings the tally up to ``trials`` (the study's, by number, as Optuna lists them)."""
        self.open_counted, self.waiting, self.running = 0, False, False
        for position in range(self.settled, len(trials)):
            trial = trials[position]
            if trial.number not in self.finished:
                self.retried.update(trial.system_attrs.get("retry_history", ()))
                if trial.state.is_finished():
                    self.finished.add(trial.number)
                    if not pinned(trial):
                        self.finished_counted += 1
                        if trial.state == TrialState.FAIL:
                            self.failed.add(trial.number)
                else:
                    self.open_counted += not pinned(trial)
                    self.waiting |= trial.state == TrialState.WAITING
                    self.running |= trial.state == TrialState.RUNNING
            if position == self.settled and trial.number in self.finished:
                self.settled += 1
        return self

    @property
    def counts(self) -> Counts:
        """The study's :class:`Counts` at the last update."""
        return Counts(self.finished_counted - len(self.failed & self.retried) + self.open_counted,
                      self.waiting, self.running)


_TALLIES: weakref.WeakKeyDictionary[optuna.Study, Tally] = weakref.WeakKeyDictionary()


def tally_of(study: optuna.Study) -> Tally:
    """The study object's :class:`Tally`, brought up to date."""
    return _TALLIES.setdefault(study, Tally()).update(study.get_trials(deepcopy=False))


def counts_of(study: optuna.Study, storage: BaseStorage) -> Counts:
    """The study's counts from the trials that changed since the last look: a database's
    rows (:class:`~.storage.DatabaseTally`), a journal file's or memory's trials (:class:`Tally`)."""
    counts = database_counts(study, storage)
    return counts if counts is not None else tally_of(study).counts


def ask(study: optuna.Study, storage: BaseStorage, queued: bool = True) -> optuna.Trial:
    """``study.ask()``, taking a queued trial first, without reading the trials that are
    neither queued nor new (Optuna's ask reads every trial its cache has not seen to find
    the queued ones). ``queued=False``: the caller's counts, read under the slot lock, saw
    none queued, so none is looked for."""
    study._thread_local.cached_all_trials = None  # as Study.ask does: the sampler reads the study afresh
    for queued_trial in open_trials(study, storage, (TrialState.WAITING,)) if queued else ():
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if study._storage.set_trial_state_values(trial_id(queued_trial), state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id(queued_trial))
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


def take_slot(study: optuna.Study, n_trials: int, storage: BaseStorage | None = None) -> optuna.Trial | str | None:
    """One look at the study (the caller holds the slot lock): a queued trial (a retry or a
    finalist) first, else a new trial while the study counts fewer than ``n_trials``;
    :data:`WAIT` while other trials run (one may fail and be queued again); None once
    the study is done."""
    storage = storage or study._storage
    counts = counts_of(study, storage)
    if counts.waiting or counts.counted < n_trials:
        return ask(study, storage, queued=counts.waiting)
    return WAIT if counts.running else None


def next_trial(study: optuna.Study, storage: BaseStorage, storage_cfg: Any, n_trials: int,
               retry: RetryLost, facts: Mapping[str, Any] | None = None) -> optuna.Trial | None:
    """Starts the next trial (see :func:`take_slot`), failing lost trials first; returns
    None once the study is done. The trial's first heartbeat and ``facts`` (where it runs)
    are one write, made once the slot lock is released (a worker killed before it leaves a
    trial that never beat: reaped from its start). Waits as :func:`backoff` says while
    other workers' trials run.

    Under the lock a worker reads counts and the trials it must (running, queued), never
    the whole study: the counts are brought up to date before the lock is taken (a
    worker's first look at a large study reads all of it once), so that under it only
    what changed since is read (:class:`Tally`, :class:`~.storage.DatabaseTally`)."""
    waits = backoff(float(storage_cfg.heartbeat_s))
    while True:
        signals.check()  # a Ctrl-C between trials stops here, before the study is written to
        counts_of(study, storage)  # what changed since the last look, read before the lock is taken
        with slot_lock(storage_cfg, study.study_name):
            reap_lost(study, storage, float(storage_cfg.grace_s), retry)
            slot = take_slot(study, n_trials, storage)
        if slot != WAIT:
            if slot is not None:
                record(slot, dict(facts or {}), system={HEARTBEAT_ATTR: time.time()})
            return slot
        signals.pause(next(waits))


def beat(storage: BaseStorage, trial: optuna.Trial | FrozenTrial) -> None:
    """Records that the trial's worker is alive now."""
    storage.set_trial_system_attr(trial_id(trial), HEARTBEAT_ATTR, time.time())


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial: optuna.Trial, interval_s: float | None) -> Iterator[None]:
    """Records the trial's heartbeat every ``interval_s`` seconds while it runs (nothing when
    None: a replay on simulated time)."""
    if interval_s is None:
        yield
        return
    stop = threading.Event()

    def beating() -> None:
        while not stop.wait(interval_s):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, StorageUnreachable):
                beat(storage, trial)

    thread = threading.Thread(target=beating, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def record_interrupted(study: optuna.Study, trial: optuna.Trial, reason: str, retry: RetryLost) -> None:
    """Fails an interrupted trial and queues its retry, deaf to further signals meanwhile
    (a second Ctrl-C must not cut the record short). A trial another worker failed already
    (its heartbeats late) has its retry queued by that worker: it is left as it is."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    try:
        trial.set_user_attr(FAIL_REASON, f"interrupted ({reason}); queued again for the next worker")
        told = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    if not str(told.user_attrs.get(FAIL_REASON, "")).startswith(LOST):
        retry(study, told)
