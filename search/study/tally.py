"""What a worker reads of a shared study without reading every trial in it: how many
trials it holds, the open ones (running, queued), the running ones with their heartbeats,
and the counts that decide whether a worker takes a trial, kept from the rows that changed.

On a database each is a query of a few columns; other storages answer from the trials
they hold. tests/search/test_coordination.py compares them with Optuna's own reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import weakref
from collections.abc import Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.search.base.keys import BASELINE, FINALIST_OF
from qkvsearch.search.base.records import database_of, through_outage
from qkvsearch.search.study.storage import HEARTBEAT_ATTR


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (Optuna keeps it private)."""
    return trial._trial_id


def trial_count(study: optuna.Study, storage: BaseStorage) -> int:
    """How many trials the study holds: a database counts them (no trial is read; Optuna's
    own count reads every trial), other storages from what they hold."""
    database = database_of(storage)
    if database is None:
        return storage.get_n_trials(study._study_id)
    from optuna.storages._rdb import models

    def count() -> int:
        with database.scoped_session() as session:
            return session.query(models.TrialModel).filter(models.TrialModel.study_id == study._study_id).count()
    return through_outage(storage, count)


def open_trials(study: optuna.Study, storage: BaseStorage, states: Sequence[TrialState]) -> list[FrozenTrial]:
    """The study's trials in ``states`` (running or queued: a few), without reading the
    others: a database filters them itself, where Optuna's cache would first read every
    trial it has not seen yet (all of them, for a worker that has just joined)."""
    database = database_of(storage)
    if database is None:
        return study.get_trials(deepcopy=False, states=tuple(states))
    return through_outage(storage, lambda: database.get_all_trials(study._study_id, deepcopy=False, states=tuple(states)))


@dataclasses.dataclass(frozen=True)
class Running:
    """What reaping needs of a running trial: when its worker last showed it was alive."""

    trial_id: int
    number: int
    heartbeat: float | None  # the last :data:`HEARTBEAT_ATTR`, None where it never beat
    started: float | None  # its start, seconds since the epoch


def running_trials(study: optuna.Study, storage: BaseStorage) -> list[Running]:
    """The study's running trials, each with its heartbeat and start: a database reads these
    three columns (one query), not the trials' parameters, attributes and intermediate values."""
    database = database_of(storage)
    if database is None:
        return [Running(trial_id(t), t.number, t.system_attrs.get(HEARTBEAT_ATTR),
                        t.datetime_start.timestamp() if t.datetime_start is not None else None)
                for t in open_trials(study, storage, (TrialState.RUNNING,))]
    from optuna.storages._rdb import models

    trials, system = models.TrialModel, models.TrialSystemAttributeModel

    def read() -> list[Running]:
        with database.scoped_session() as session:
            rows = (session.query(trials.trial_id, trials.number, trials._datetime_start_utc, system.value_json)
                    .outerjoin(system, sqlalchemy.and_(system.trial_id == trials.trial_id, system.key == HEARTBEAT_ATTR))
                    .filter(trials.study_id == study._study_id, trials.state == TrialState.RUNNING)
                    .order_by(trials.trial_id).all())
        return [Running(ident, number, json.loads(beat) if beat is not None else None,  # Optuna stores naive UTC
                        started.replace(tzinfo=datetime.UTC).timestamp() if started is not None else None)
                for ident, number, started, beat in rows]
    return through_outage(storage, read)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What :func:`~qkvsearch.search.study.workers.take_slot` needs of a study."""

    counted: int  # trials that count towards n_trials (see workers.py)
    waiting: bool  # a queued trial is there to take
    running: bool  # another worker's trial runs


#: A trial row with a lower id than one seen this long ago has been committed (or rolled
#: back) by now: each row is written in one short transaction, after its id was drawn.
COMMIT_HORIZON_S = 60.0
#: Up to this many trial ids, the marks and lineage of the trials that can still change are
#: read by id; past it (a worker's first look), by the range of ids
_BY_ID = 500


class DatabaseTally:
    """:class:`Counts` of one study in a database, kept from the rows that can still change:
    a finished trial never does, so its state, marks (a finalist's or baseline's) and the
    lineage of its retry are read once.

    A look reads the ids and states of the new rows and of the open ones (running, queued),
    and the marks and lineage of those not yet tallied. Rows can commit out of id order
    (PostgreSQL draws an id before its transaction commits), so a finished row is settled
    only once it has been seen for :data:`COMMIT_HORIZON_S`; until then each look also
    counts the rows in the unsettled range, and reads the range again only when that count
    shows a row it has not seen (a late one). The first look reads the whole study once.
    One per study object (:func:`database_counts`)."""

    def __init__(self, study_id: int, clock: Any = time.monotonic) -> None:
        self.study_id, self.clock = study_id, clock
        self.settled = 0  # every row of the study with a trial id below this is finished and tallied
        self.top = 0  # every row seen has a trial id below this
        self.tallied: set[int] = set()  # trial ids from settled on, finished and tallied
        self.open: set[int] = set()  # trial ids from settled on, running or queued at the last look
        self.first_seen: dict[int, float] = {}  # trial ids from settled on: when this tally first saw each
        self.finished_counted = 0  # finished, neither a finalist's nor a baseline's
        self.failed: set[int] = set()  # numbers of failed search trials (they count unless retried)
        self.retried: set[int] = set()  # numbers of failed trials with a retry (each retry's retry_history)
        self.marked_open: set[int] = set()  # open trial ids that are a finalist's or a baseline
        self.rows_read = 0  # trial rows the last look read (what the tests and the benchmark watch)

    def update(self, database: RDBStorage) -> Counts:
        """One look: reads what can have changed, then brings the tally up to it."""
        from optuna.storages._rdb import models

        trials, user, system = models.TrialModel, models.TrialUserAttributeModel, models.TrialSystemAttributeModel
        mine = trials.study_id == self.study_id
        with database.scoped_session() as session:
            unsettled = trials.trial_id >= self.settled
            whole = self.top == self.settled or len(self.open) > _BY_ID or (
                session.query(sqlalchemy.func.count(trials.trial_id))
                .filter(mine, unsettled, trials.trial_id < self.top).scalar() != len(self.tallied) + len(self.open))
            changed = unsettled if whole else sqlalchemy.or_(trials.trial_id >= self.top, trials.trial_id.in_(self.open))
            rows = session.query(trials.trial_id, trials.number, trials.state).filter(mine, changed).all()
            fresh = [row for row in rows if row.trial_id not in self.tallied and row.trial_id not in self.open]
            ids = [row.trial_id for row in fresh]

            def of(model: Any, query: Any) -> Any:
                if len(ids) <= _BY_ID:
                    return query.filter(model.trial_id.in_(ids)) if ids else None
                return query.join(trials, model.trial_id == trials.trial_id).filter(mine, unsettled)
            marks = of(user, session.query(user.trial_id).filter(user.key.in_([FINALIST_OF, BASELINE])))
            lineage = of(system, session.query(system.trial_id, system.value_json).filter(system.key == "retry_history"))
            marked = {trial for (trial,) in marks} if marks is not None else set()
            retries = {trial: json.loads(value) for trial, value in lineage} if lineage is not None else {}
        now = self.clock()
        for row in fresh:  # marks and lineage are written with the row: read once, when it is first seen
            self.first_seen[row.trial_id] = now
            self.retried.update(retries.get(row.trial_id, ()))
            if row.trial_id in marked:
                self.marked_open.add(row.trial_id)
        open_counted = waiting = running = 0
        for row in rows:
            if row.trial_id in self.tallied:
                continue
            self.top = max(self.top, row.trial_id + 1)
            if row.state.is_finished():
                self.open.discard(row.trial_id)
                self.tallied.add(row.trial_id)
                if row.trial_id not in self.marked_open:
                    self.finished_counted += 1
                    if row.state == TrialState.FAIL:
                        self.failed.add(row.number)
                self.marked_open.discard(row.trial_id)
            else:
                self.open.add(row.trial_id)
                open_counted += row.trial_id not in self.marked_open
                waiting |= row.state == TrialState.WAITING
                running |= row.state == TrialState.RUNNING
        for ident in sorted(self.first_seen):  # settle the finished prefix old enough to be whole
            if ident not in self.tallied or now - self.first_seen[ident] < COMMIT_HORIZON_S:
                break
            self.settled = ident + 1
        self.tallied = {i for i in self.tallied if i >= self.settled}
        self.first_seen = {i: t for i, t in self.first_seen.items() if i >= self.settled}
        self.rows_read = len(rows)
        return Counts(counted=self.finished_counted - len(self.failed & self.retried) + open_counted,
                      waiting=bool(waiting), running=bool(running))


_DATABASE_TALLIES: weakref.WeakKeyDictionary[optuna.Study, DatabaseTally] = weakref.WeakKeyDictionary()


def database_counts(study: optuna.Study, storage: BaseStorage) -> Counts | None:
    """The study's :class:`Counts` from its database (None for other storages), through the
    study object's :class:`DatabaseTally`: after the first look, a look reads the few rows
    that changed, not every trial ever run."""
    database = database_of(storage)
    if database is None:
        return None
    tally = _DATABASE_TALLIES.setdefault(study, DatabaseTally(study._study_id))
    return through_outage(storage, lambda: tally.update(database))
