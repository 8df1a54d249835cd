"""Optuna storage from config, the study created once, and the locks that serialise workers.

Liveness is the workers' (``workers.py``): a running trial's heartbeat is its system
attribute :data:`HEARTBEAT_ATTR`, the same on every kind of storage. The few private
Optuna names this project reads (a trial's and a study's storage ids; RDBStorage's session
and row models, and a row's start column, naive UTC) are read here and in ``reader.py``,
and tests/search/test_coordination.py and test_faults.py break if Optuna changes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import BASELINE, FINALIST_OF
from qkvsearch.search.base.records import CONSTRAINTS_KEY, database_of, through_outage
from qkvsearch.search.base.settings import check_study_name
from qkvsearch.search.study.reader import ChunkedRDBStorage
from qkvsearch.search.study.resilient import Outage, ResilientStorage, lost_connection

STORAGE_KINDS = ("rdb", "journal", "grpc")
#: Trial system attribute that carries a running trial's last heartbeat (seconds since the epoch).
HEARTBEAT_ATTR = "qkv:heartbeat"
#: How Optuna's system attributes of a trial's constraint values begin (``constraints:max_params``).
CONSTRAINTS_PREFIX = CONSTRAINTS_KEY


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


class StorageError(QkvError):
    """The storage cannot be opened or reached."""


def storage_url(cfg: Any) -> str:
    """Returns the URL (or journal path, or the proxy's address) that names the storage, for
    messages and the dashboard."""
    if cfg.kind == "grpc":
        return f"grpc://{cfg.host}:{cfg.port}"
    return str(cfg.url if cfg.kind == "rdb" else cfg.path)


def storage_file(cfg: Any) -> pathlib.Path | None:
    """The file behind a SQLite or journal storage (None for a server)."""
    if cfg.get("kind") == "journal":
        return pathlib.Path(cfg.path)
    if cfg.get("kind") == "grpc":
        return None
    url = str(cfg.get("url") or "")
    return pathlib.Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def open_resilient(cfg: Any) -> BaseStorage:
    """:func:`open_storage` for a sweep's workers: a database server's storage through
    :class:`ResilientStorage`, riding out a restart of up to ``storage.outage_s`` seconds
    (SQLite and journal files have no server to wait for)."""
    storage = open_storage(cfg)
    if cfg.kind == "grpc":  # the proxy restarting, or its database behind it
        return ResilientStorage(storage, Outage(storage_url(cfg), float(cfg.get("outage_s", 300))))
    if not isinstance(storage, RDBStorage) or str(cfg.url).startswith("sqlite"):
        return storage
    # outside Optuna's own cache of finished trials, which it puts around an RDBStorage it is given
    return ResilientStorage(optuna.storages.get_storage(storage), Outage(storage_url(cfg), float(cfg.get("outage_s", 300))))


def open_storage(cfg: Any, must_exist: bool = False) -> BaseStorage:
    """Opens the storage ``cfg`` describes: ``{kind: rdb, url}`` or ``{kind: journal, path}``,
    each with ``heartbeat_s`` and ``grace_s`` (a running trial records a heartbeat every
    ``heartbeat_s`` seconds; one silent for ``grace_s`` is failed and retried: ``workers.py``).

    Commands that only read a study pass ``must_exist``, so a wrong path creates nothing.

    Raises:
        StorageError: unknown kind, bad timings, a missing file where it must exist, or
            the storage cannot be reached.
    """
    kind = cfg.get("kind")
    if kind not in STORAGE_KINDS:
        raise StorageError(f"storage.kind: unknown {kind!r}; valid: {', '.join(STORAGE_KINDS)}")
    path = storage_file(cfg)
    if must_exist and path is not None and not path.is_file():
        raise StorageError(f"no storage at {path}: run `qkv sweep` first, or point storage=/run_root= at a sweep's")
    heartbeat_s, grace_s = int(cfg.get("heartbeat_s", 30)), int(cfg.get("grace_s", 120))
    if heartbeat_s < 1 or grace_s <= heartbeat_s:
        raise StorageError(
            f"storage.heartbeat_s ({heartbeat_s}) must be >= 1 and storage.grace_s ({grace_s}) larger than it"
        )
    if kind == "grpc":
        return _open_proxy(cfg)
    try:
        if kind == "journal":
            # absolute: the lock is a symlink to this path, and a relative one would dangle from
            # inside its folder, so that Optuna never saw a killed writer's lock grow stale
            path = pathlib.Path(cfg.path).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = JournalFileSymlinkLock(str(path), grace_period=int(cfg.get("lock_grace_s", 30)))
            repair_journal_tail(path, lock)
            return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
        with storage_lock(cfg, "qkvsearch-schema"):  # one process creates the tables; the others wait
            if str(cfg.url).startswith("sqlite"):  # a file: nothing to wait out (a locked one is retried below)
                return _open_rdb(str(cfg.url))
            # a server that is not there at the start is most often a wrong URL: say so at once,
            # unless the user lets workers wait for one (SLURM jobs that may start in a restart);
            # once this process has reached it, a failure is a restart, ridden out for outage_s
            url = str(cfg.url)
            wait_s = float(cfg.get("outage_s", 300)) if url in _REACHED else float(cfg.get("open_wait_s", 0))
            storage = Outage(storage_url(cfg), wait_s).call(_open_rdb, url) if wait_s > 0 else _open_rdb(url)
            _REACHED.add(url)
            return storage
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ImportError, ValueError) as error:
        raise StorageError(f"cannot open storage {storage_url(cfg)}: {error}") from None


def _open_proxy(cfg: Any) -> BaseStorage:
    """A client of the gRPC storage proxy at ``storage.host:port`` (``qkv storage-proxy``):
    a proxy that does not answer is a clear error at once (or after ``open_wait_s``)."""
    try:
        import grpc  # noqa: F401  (Optuna imports it lazily: missing, it would fail at the first call)
        from optuna.storages import GrpcStorageProxy
    except ImportError:
        raise StorageError("storage=grpc needs grpcio: pip install 'qkvsearch[grpc]'") from None
    where = storage_url(cfg)
    wait_s = float(cfg.get("outage_s", 300)) if where in _REACHED else float(cfg.get("open_wait_s", 0))
    proxy = GrpcStorageProxy(host=str(cfg.host), port=int(cfg.port))
    try:
        proxy.wait_server_ready(timeout=max(wait_s, 5.0))
    except ConnectionError:
        proxy.close()
        raise StorageError(f"cannot open storage {where}: no storage proxy answers there within {max(wait_s, 5.0):.0f} s; "
                           f"start one with `qkv storage-proxy storage.url=...` or point storage.host/port at it") from None
    _REACHED.add(where)
    return proxy


def repair_journal_tail(path: pathlib.Path, lock: JournalFileSymlinkLock) -> None:
    """Cuts a partial last line (what a full disk or power loss leaves) off a journal file,
    under the journal's own lock, before anything appends to it; keeps the cut bytes in a
    ``.partial-<time>`` file beside it and says so."""
    if not path.exists() or path.stat().st_size == 0:
        return
    lock.acquire()
    try:
        with open(path, "rb+") as journal:
            size = journal.seek(0, 2)
            journal.seek(max(0, size - 1))
            if journal.read(1) == b"\n":
                return
            tail_start = size
            while tail_start > 0:
                step = min(65536, tail_start)
                journal.seek(tail_start - step)
                block = journal.read(step)
                newline = block.rfind(b"\n")
                if newline >= 0:
                    tail_start = tail_start - step + newline + 1
                    break
                tail_start -= step
            journal.seek(tail_start)
            partial = journal.read()
            kept = path.with_name(f"{path.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}")
            kept.write_bytes(partial)
            journal.truncate(tail_start)
        print(
            f"qkv: warning: {path} ended in a partial record ({len(partial)} bytes, an interrupted write); "
            f"cut it off so the journal stays readable (kept in {kept})", file=sys.stderr,
        )
    finally:
        lock.release()


def _open_rdb(url: str, attempts: int = 6) -> ChunkedRDBStorage:
    """Opens an RDB storage; retries the races that a lock cannot exclude (SQLite busy)."""
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql://", "postgresql+psycopg2://")):  # a host that drops packets fails, not hangs
        engine["connect_args"] = {"connect_timeout": 10}
    if url.startswith("sqlite:///"):
        pathlib.Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}
    for attempt in range(attempts):
        try:
            return ChunkedRDBStorage(url, engine_kwargs=engine)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as error:
            racing = isinstance(error, sqlalchemy.exc.IntegrityError) or any(
                text in str(error) for text in ("already exists", "locked", "duplicate key")
            )
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def create_or_load_study(
    storage: BaseStorage, name: str, directions: Sequence[str], sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Creates the study, or loads it when it exists, and checks its directions. Callers
    that may start together hold :func:`slot_lock` around it.

    Raises:
        ValueError: the existing study optimises other directions than ``directions``.
    """
    study = optuna.create_study(
        storage=storage, study_name=check_study_name(name), directions=list(directions),
        sampler=sampler, pruner=pruner, load_if_exists=True,
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != [d.lower() for d in directions]:
        raise QkvError(
            f"study {name!r} already exists with directions {existing}, but the config asks for "
            f"{list(directions)}; choose another study_name or the same objectives"
        )
    return study


@contextlib.contextmanager
def storage_lock(cfg: Any, key_name: str) -> Iterator[None]:
    """An exclusive lock named ``key_name`` shared by every process using the storage.

    File storages use a lock file beside them; PostgreSQL uses an advisory lock, so
    workers on several machines agree too.
    """
    key = int(hashlib.sha256(key_name.encode()).hexdigest()[:15], 16)
    url = str(cfg.get("url") or "")
    # (behind a gRPC proxy too: the proxy has no lock, its database's advisory lock serves)
    if cfg.kind in ("rdb", "grpc") and url.startswith("postgresql"):
        engine = _lock_engine(url)

        def acquire() -> sqlalchemy.Connection:
            connection = engine.connect()
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            except BaseException:
                connection.close()
                raise
            return connection

        # through a restart once this process has reached the server; before, as opening does
        wait_s = float(cfg.get("outage_s", 300)) if url in _REACHED else float(cfg.get("open_wait_s", 0))
        connection = Outage(url, wait_s).call(acquire) if wait_s > 0 else acquire()
        _REACHED.add(url)
        try:
            yield
        finally:
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            except sqlalchemy.exc.SQLAlchemyError as error:
                if lost_connection(error) is None:
                    raise
                connection.invalidate()  # the server restarted: its session, and the lock with it, are gone
            finally:
                connection.close()
        return
    path = storage_file(cfg)
    if path is None:
        raise StorageError(f"no cross-process lock for storage {url!r}; use sqlite, postgresql (behind storage=grpc too) "
                           "or a journal file")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f"{path.name}.{key:x}.lock")
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: one engine (one pooled, pre-pinged connection) per PostgreSQL URL and process for the advisory locks
_LOCK_ENGINES: dict[tuple[str, int], sqlalchemy.Engine] = {}
#: the server URLs this process has reached once (a later failure is an outage, not a wrong URL)
_REACHED: set[str] = set()


def _lock_engine(url: str) -> sqlalchemy.Engine:
    key = (url, os.getpid())  # a forked process makes its own
    if key not in _LOCK_ENGINES:
        _LOCK_ENGINES[key] = sqlalchemy.create_engine(url, pool_size=1, max_overflow=2, pool_pre_ping=True,
                                                      connect_args={"connect_timeout": 10})
    return _LOCK_ENGINES[key]


def slot_lock(cfg: Any, study_name: str) -> contextlib.AbstractContextManager[None]:
    """Serialises 'count the trials, then start one' across every worker of a study."""
    return storage_lock(cfg, study_name)


def latest_study(storage: BaseStorage) -> str:
    """The study whose first trial started last (the most recent sweep). Reads each study's
    first trial only (Optuna's study summaries read every trial of every study)."""
    studies = storage.get_all_studies()
    if not studies:
        raise QkvError("no study found in this storage; run `qkv sweep` first or give storage=...")
    epoch = datetime.datetime.min

    def started(study: optuna.study.FrozenStudy) -> datetime.datetime:
        try:
            first = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, 0))
        except KeyError:  # no trial yet
            return epoch
        return first.datetime_start or epoch

    return max(studies, key=started).study_name


def load_named_study(cfg: Any, name: str | None) -> optuna.Study:
    """Loads study ``name`` (None: the latest) from the storage ``cfg`` describes.

    Raises:
        ValueError: a name that is not a plain name, or no such study; the message lists
            the studies there are.
    """
    if name is not None:
        check_study_name(name)
    storage = open_storage(cfg, must_exist=True)
    name = name or latest_study(storage)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        raise QkvError(f"study {name!r} not found in {storage_url(cfg)}; studies: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)
