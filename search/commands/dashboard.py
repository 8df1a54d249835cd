"""``qkv dashboard``: the real optuna-dashboard on a sweep's storage, bound to loopback."""

from __future__ import annotations

import abc
import copy
import pathlib
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import DictConfig
from optuna.storages import BaseStorage

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.errors import Interrupted
from qkvsearch.search.base.network import check_port, is_loopback
from qkvsearch.search.base.records import ARCH_PREFIX
from qkvsearch.search.inspect.artifacts import open_store
from qkvsearch.search.study.storage import open_storage, read_latest_studies, storage_url

if TYPE_CHECKING:
    from optuna.study._frozen import FrozenStudy

#: HTTP methods a read-only dashboard answers; every other one is refused.
READING = ("GET", "HEAD", "OPTIONS")


def read_only(app: Callable[..., Any]) -> Callable[..., Any]:
    """A WSGI filter that refuses every request that could change a study (403)."""

    def filtered(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("REQUEST_METHOD", "GET").upper() not in READING:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"this dashboard is read-only; qkv dashboard read_only=false allows changes\n"]
        return app(environ, start_response)

    return filtered


#: what optuna-dashboard's rename would lose: it copies a study's trials, user attributes and
#: notes to a new study and deletes the old one, but not the system attributes, where a sweep
#: keeps the architectures `qkv export` and the finalists read
RENAME_REFUSED = (b"renaming a study here would drop its system attributes (the architectures qkvsearch stores, "
                  b"which qkv export needs): optuna-dashboard copies only trials, user attributes and notes. "
                  b"optuna.copy_study(...) keeps them all\n")


def guarded(app: Callable[..., Any], writable: bool) -> Callable[..., Any]:
    """The app as served: read-only unless writes are asked for, and never a rename."""
    app = app if writable else read_only(app)

    def filtered(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "").rstrip("/").endswith("/rename"):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [RENAME_REFUSED]
        return app(environ, start_response)

    return filtered


def exposure_warning(host: str, writable: bool) -> str | None:
    """What a user must hear before a dashboard is served beyond this machine."""
    if is_loopback(host):
        return None
    risk = ("anyone who can reach it can delete studies and trials: optuna-dashboard has no authentication"
            if writable else "anyone who can reach it can read every study, trial and artifact (it has no authentication)")
    return (f"qkv: warning: serving on {host}, not loopback: {risk}. To watch a cluster's sweep, keep the default "
            f"host and tunnel instead: ssh -L 8080:127.0.0.1:8080 <node>")


class WithoutArchitectures(BaseStorage):
    """A storage as optuna-dashboard sees it: every call passes through, except that a study's
    system attributes leave out the architectures a sweep stores there (one per distinct
    architecture). optuna-dashboard scans all of a study's system attributes once for every
    trial it sends (looking for that trial's artifacts), so a study page's cost would grow with
    trials times architectures: 10,900 trials of 603 architectures, 6.6 million key checks."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    def __getattr__(self, name: str) -> Any:  # the wrapped storage's own extras (heartbeats, its cache)
        if name == "_storage":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._storage, name)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return _without_architectures(self._storage.get_study_system_attrs(study_id))

    def get_all_studies(self) -> list[FrozenStudy]:
        studies = [copy.copy(study) for study in self._storage.get_all_studies()]
        for study in studies:
            study.system_attrs = _without_architectures(study.system_attrs)
        return studies


def _without_architectures(attrs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attrs.items() if not key.startswith(ARCH_PREFIX)}


def _passed_on(name: str) -> Callable[..., Any]:
    def call(self: WithoutArchitectures, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._storage, name)(*args, **kwargs)

    call.__name__ = name
    return call


# optuna-dashboard takes a BaseStorage only; every method of one is the wrapped storage's own
# (its cache and SQL shortcuts, not BaseStorage's defaults), the system attributes aside
for _name, _method in vars(BaseStorage).items():
    if callable(_method) and not _name.startswith("_") and _name not in vars(WithoutArchitectures):
        setattr(WithoutArchitectures, _name, _passed_on(_name))
abc.update_abstractmethods(WithoutArchitectures)


#: trials a dashboard reads in the background once it serves (the latest studies first), so
#: that the first page of a large study does not wait for its read
WARM_TRIALS = 50_000


def dashboard_app(storage: Any, store: Any = None) -> tuple[Callable[..., Any], threading.Thread]:
    """optuna-dashboard's app on ``storage`` (a database through Optuna's cache of finished
    trials, so that a page refreshed while a sweep runs reads only the trials that changed,
    not the whole study), and the started thread that reads the latest studies into that
    cache (up to :data:`WARM_TRIALS` trials; a page asked for meanwhile waits for it, as it
    would wait for its own read)."""
    import optuna_dashboard

    storage = optuna.storages.get_storage(storage)  # an RDBStorage: Optuna's cache in front of it

    def warm() -> None:
        for _ in read_latest_studies(storage, WARM_TRIALS):
            pass

    warming = threading.Thread(target=warm, daemon=True, name="dashboard-warm")
    warming.start()
    return optuna_dashboard.wsgi(WithoutArchitectures(storage), artifact_store=store), warming


def serve(cfg: DictConfig, storage: Any = None) -> None:
    """Checks the storage and the port, then serves until interrupted. ``storage``: the one
    ``cfg.storage`` describes, when the caller has opened it already."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    if not isinstance(cfg.read_only, bool):
        raise QkvError(f"read_only must be true or false, got {cfg.read_only!r}")
    writable = not cfg.read_only
    storage = storage if storage is not None else open_storage(cfg.storage, must_exist=True)
    studies = storage.get_all_studies()  # Optuna's summaries would read every trial of every study
    if not studies:
        raise QkvError(f"no study found in {storage_url(cfg.storage)}; run `qkv sweep` first, or give storage=...")
    check_port(cfg.host, cfg.port)
    store = open_store(cfg.artifacts) if cfg.artifacts and pathlib.Path(cfg.artifacts).exists() else None
    warning = exposure_warning(cfg.host, writable)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app, _ = dashboard_app(storage, store)
    names = ", ".join(s.study_name for s in studies)

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    server = make_server(cfg.host, cfg.port, guarded(app, writable), handler_class=Quiet)
    mode = "" if writable else ", read-only"
    print(f"optuna-dashboard for {storage_url(cfg.storage)} ({names}{mode}) at http://{cfg.host}:{cfg.port}/dashboard", flush=True)
    try:
        server.serve_forever()
    except (Interrupted, KeyboardInterrupt):  # Ctrl-C is how a server is stopped: not an error
        print("dashboard stopped", file=sys.stderr)
    finally:
        server.server_close()
