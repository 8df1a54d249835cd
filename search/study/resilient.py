"""A storage that rides out its database's restarts.

:class:`ResilientStorage` wraps the storage a sweep opens: a call that fails for want of a
connection (the server shutting down, restarting, unreachable) is tried again with
backoff, for up to ``outage_s`` seconds, so workers keep their trials through a restart.
Every Optuna write is one transaction, so a call cut short leaves no half-written row; the
engine pre-pings its pooled connections, so the first call after a restart reconnects.
Past ``outage_s`` the storage is down for good in this process: :class:`StorageUnreachable`
(a ``BaseException``, so a trial's own error handling does not take it for the trial's
failure) ends the worker with one line, and its trial is retried by the others once its
heartbeat is stale. Right after an outage, a worker does not fail other workers' trials for
silence until they have had a grace period to beat again (:attr:`recovered_at`).
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.storages import BaseStorage, RDBStorage

from qkvsearch.search.base import signals
from qkvsearch.search.base.errors import StorageUnreachable

#: what a lost connection raises (the server shut down, restarted, or cannot be reached)
CONNECTION_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def lost_connection(error: BaseException | None) -> BaseException | None:
    """The lost connection ``error`` is or wraps (Optuna wraps it in StorageInternalError), else None."""
    while error is not None:
        if isinstance(error, CONNECTION_ERRORS) or (isinstance(error, sqlalchemy.exc.DBAPIError)
                                                    and error.connection_invalidated) or _proxy_lost(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _proxy_lost(error: BaseException) -> bool:
    """A gRPC storage proxy that cannot be reached (UNAVAILABLE), or one whose own database
    connection was lost (its call failed with the driver's OperationalError: UNKNOWN)."""
    code = getattr(error, "code", None)
    if not type(error).__module__.startswith("grpc") or not callable(code):
        return False
    name = getattr(code(), "name", "")
    details = str(getattr(error, "details", lambda: "")() or "")
    return name == "UNAVAILABLE" or (name == "UNKNOWN" and any(e.__name__ in details for e in CONNECTION_ERRORS))


def _first_line(error: BaseException) -> str:
    """The database's own words: the driver's error, without SQLAlchemy's statement and links."""
    details = getattr(error, "details", None)  # a gRPC error's own words
    text = str(details() if callable(details) and details() else getattr(error, "orig", None) or error)
    return (text.strip().splitlines() or [type(error).__name__])[0][:200]


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a storage call raises when its server is away: Optuna's and SQLAlchemy's errors,
    and gRPC's once the gRPC proxy's client is in use (grpcio is optional)."""
    grpc = sys.modules.get("grpc")
    return (StorageInternalError, sqlalchemy.exc.SQLAlchemyError, *((grpc.RpcError,) if grpc else ()))


class Outage:
    """One policy for every call that needs the database: retry a lost connection with
    backoff (0.5 s doubling to 10 s) for up to ``outage_s`` seconds, then give up for good."""

    def __init__(self, where: str, outage_s: float) -> None:
        self.where, self.outage_s = where, outage_s
        self.down = ""  # why this process gave up on the storage, once it has
        self.recovered_at = 0.0  # wall-clock time of the last recovery

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise StorageUnreachable(self.down)
        began, delay = None, 0.5
        while True:
            try:
                result = function(*args, **kwargs)
            except _storage_errors() as error:
                lost = lost_connection(error)
                if lost is None:
                    if began is not None:  # the server answered, with its own error: the outage is over
                        self._back(began)
                    raise
                now = time.monotonic()
                if began is None:
                    began = now
                    print(f"qkv: warning: storage {self.where}: connection lost ({_first_line(lost)}); "
                          f"retrying for up to {self.outage_s:.0f} s", file=sys.stderr, flush=True)
                if now - began >= self.outage_s:
                    self.down = (f"storage {self.where} unreachable for {now - began:.0f} s (storage.outage_s="
                                 f"{self.outage_s:g}): {_first_line(lost)}; this worker stops, its trial "
                                 "is retried by the others")
                    raise StorageUnreachable(self.down) from None
                signals.pause(min(delay, max(0.0, self.outage_s - (now - began))))
                delay = min(2 * delay, 10.0)
                continue
            except Exception:
                if began is not None:  # an answer all the same (a finished trial's UpdateFinishedTrialError)
                    self._back(began)
                raise
            if began is not None:
                self._back(began)
            return result

    def _back(self, began: float) -> None:
        self.recovered_at = time.time()
        print(f"qkv: warning: storage {self.where}: connection back after {time.monotonic() - began:.0f} s",
              file=sys.stderr, flush=True)


class ResilientStorage(BaseStorage):
    """``inner``'s every public method through :class:`Outage` (built below, one wrapper a method)."""

    def __init__(self, inner: BaseStorage, outage: Outage) -> None:
        self._inner, self._outage = inner, outage

    @property
    def inner(self) -> BaseStorage:
        return self._inner

    @property
    def recovered_at(self) -> float:
        return self._outage.recovered_at

    def through_outage(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls ``function`` (a write of several rows at once, ``base/records.py``) as every
        storage call is made: retried while the server is away, up to the outage limit."""
        return self._outage.call(function, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else the inner storage has
        return getattr(self._inner, name)


def _through_outage(name: str) -> Callable[..., Any]:
    def method(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._outage.call(getattr(self._inner, name), *args, **kwargs)

    method.__name__ = name
    return method


for _name, _ in inspect.getmembers(RDBStorage, predicate=inspect.isfunction):
    if not _name.startswith("_") and _name not in ("upgrade", "get_current_version", "get_head_version",
                                                   "get_all_versions"):
        setattr(ResilientStorage, _name, _through_outage(_name))
ResilientStorage.__abstractmethods__ = frozenset()
