"""Optuna storage from config, the study created once, and the lock that hands out trial slots."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import pathlib
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

STORAGE_KINDS = ("rdb", "journal")
HEARTBEAT_S = 30
GRACE_S = 120


class StorageError(RuntimeError):
    """The storage cannot be opened or reached."""


def storage_url(cfg: Any) -> str:
    """Returns the URL (or journal path) that names the storage, for messages and the dashboard."""
    return str(cfg.url if cfg.kind == "rdb" else cfg.path)


def open_storage(cfg: Any) -> BaseStorage:
    """Opens the storage ``cfg`` describes: ``{kind: rdb, url}`` or ``{kind: journal, path}``.

    RDB storages record heartbeats, so trials of a worker that died are failed and
    their slots freed for the others.

    Raises:
        StorageError: unknown kind, or the storage cannot be reached.
    """
    kind = cfg.get("kind")
    if kind not in STORAGE_KINDS:
        raise StorageError(f"storage.kind: unknown {kind!r}; valid: {', '.join(STORAGE_KINDS)}")
    try:
        if kind == "journal":
            path = pathlib.Path(cfg.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        return _open_rdb(str(cfg.url))
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ImportError, ValueError) as error:
        raise StorageError(f"cannot open storage {storage_url(cfg)}: {error}") from None


def _open_rdb(url: str, attempts: int = 6) -> RDBStorage:
    """Opens an RDB storage. Workers that start together race to create its tables (a
    UNIQUE or 'already exists' error for the loser), so creation is retried."""
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        pathlib.Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}
    for attempt in range(attempts - 1):
        try:
            return _rdb(url, engine)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as error:
            racing = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error) or "locked" in str(error)
            if not racing:
                raise
            time.sleep(0.2 * (attempt + 1))
    return _rdb(url, engine)


def _rdb(url: str, engine: dict[str, Any]) -> RDBStorage:
    with warnings.catch_warnings():  # heartbeats are experimental in Optuna; used on purpose
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def create_or_load_study(
    storage: BaseStorage, name: str, directions: Sequence[str], sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner, attempts: int = 5,
) -> optuna.Study:
    """Creates the study, or loads it when another process did, and checks its directions.

    Concurrent first starts can race on creation (an IntegrityError in RDB storages);
    the loser loads the winner's study.

    Raises:
        ValueError: the existing study optimises other directions than ``directions``.
    """
    for attempt in range(attempts):
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, directions=list(directions),
                sampler=sampler, pruner=pruner, load_if_exists=True,
            )
            break
        except (sqlalchemy.exc.IntegrityError, optuna.exceptions.DuplicatedStudyError):
            time.sleep(0.1 * (attempt + 1))
    else:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    existing = [d.name.lower() for d in study.directions]
    if existing != [d.lower() for d in directions]:
        raise ValueError(
            f"study {name!r} already exists with directions {existing}, but the config asks for "
            f"{list(directions)}; choose another study_name or the same objectives"
        )
    return study


@contextlib.contextmanager
def slot_lock(cfg: Any, study_name: str) -> Iterator[None]:
    """Serialises 'count the trials, then start one' across every worker of a study.

    File storages use a lock file beside them; PostgreSQL uses an advisory lock, so
    workers on several machines agree too.
    """
    key = int(hashlib.sha256(study_name.encode()).hexdigest()[:15], 16)
    url = str(cfg.get("url") or "")
    if cfg.kind == "rdb" and url.startswith("postgresql"):
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    if cfg.kind == "journal":
        path = pathlib.Path(cfg.path)
    elif url.startswith("sqlite:///"):
        path = pathlib.Path(url.removeprefix("sqlite:///"))
    else:
        raise StorageError(f"no cross-process lock for storage {url!r}; use sqlite, postgresql or a journal file")
    lock_path = path.with_name(f"{path.name}.{key:x}.lock")
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def latest_study(storage: BaseStorage) -> str:
    """The study whose first trial started last (the most recent sweep)."""
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        raise ValueError("no study found in this storage; run `qkv sweep` first or give storage=...")
    epoch = datetime.datetime.min
    return max(summaries, key=lambda s: s.datetime_start or epoch).study_name


def load_named_study(cfg: Any, name: str | None) -> optuna.Study:
    """Loads study ``name`` (None: the latest) from the storage ``cfg`` describes.

    Raises:
        ValueError: no such study; the message lists the studies there are.
    """
    storage = open_storage(cfg)
    name = name or latest_study(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        raise ValueError(f"study {name!r} not found in {storage_url(cfg)}; studies: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)
