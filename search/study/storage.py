"""Optuna storage from config, the study created once, and the locks that serialise workers.

Liveness is the workers' (``workers.py``): a running trial's heartbeat is its system
attribute :data:`HEARTBEAT_ATTR`, the same on every kind of storage. The few private
Optuna names this project reads (a trial's and a study's storage ids; RDBStorage's session
and row models, and a row's start column, naive UTC) are read here, in ``tally.py`` (what a
worker reads of a study without reading every trial) and in ``reader.py``, and
tests/search/test_coordination.py and test_faults.py break if Optuna changes them.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.records import CONSTRAINTS_KEY
from qkvsearch.search.base.settings import check_study_name
from qkvsearch.search.study.reader import ChunkedRDBStorage
from qkvsearch.search.study.resilient import Outage, ResilientStorage, lost_connection

STORAGE_KINDS = ("rdb", "journal", "grpc")
#: Trial system attribute that carries a running trial's last heartbeat (seconds since the epoch).
HEARTBEAT_ATTR = "qkv:heartbeat"
#: How Optuna's system attributes of a trial's constraint values begin (``constraints:max_params``).
CONSTRAINTS_PREFIX = CONSTRAINTS_KEY


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

        from qkvsearch.search.study.proxy_client import DecodedOnceProxy
    except ImportError:
        raise StorageError("storage=grpc needs grpcio: pip install 'qkvsearch[grpc]'") from None
    where = storage_url(cfg)
    wait_s = float(cfg.get("outage_s", 300)) if where in _REACHED else float(cfg.get("open_wait_s", 0))
    proxy = DecodedOnceProxy(host=str(cfg.host), port=int(cfg.port))
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
                connection.commit()  # ends the transaction, so closing has nothing to roll back on the server
            except sqlalchemy.exc.SQLAlchemyError as error:
                # the server ended the session (a restart) before or just after the unlock:
                # the lock went with it
                if lost_connection(error) is None:
                    raise
                connection.invalidate()
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


def read_latest_studies(storage: BaseStorage, up_to: int) -> Iterator[list[FrozenTrial]]:
    """Each study's trials, the latest created first, while they come to at most ``up_to``
    trials in all: what a server reads in the background when it starts (into Optuna's
    cache in front of a database), so that the first request for a large study does not
    wait for that read. A study that cannot be read is passed over, and a storage that
    cannot list its studies gives none: the request's own read will say what is wrong."""
    try:
        studies = storage.get_all_studies()
    except Exception:  # noqa: BLE001 - see above
        return
    read = 0
    for study in sorted(studies, key=lambda s: s._study_id, reverse=True):
        try:
            if read + storage.get_n_trials(study._study_id) > up_to:
                return
            trials = storage.get_all_trials(study._study_id, deepcopy=False)
        except Exception:  # noqa: BLE001, S112 - see above
            continue
        read += len(trials)
        yield trials


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
