"""``qkv storage-proxy``: Optuna's gRPC storage proxy in front of a sweep's database.

Workers of ``storage=grpc`` send their storage calls here; the proxy holds the database
connections and a cache of each study's trials, so a hundred workers need not each hold
their own connections and read the study from the server. What the proxy does not carry,
the project covers itself: heartbeats are trial attributes (``qkv:heartbeat``), written and
read through it like any other; the slot lock that serialises taking a trial is the
database's advisory lock, one connection per worker (``storage.url``). It speaks plain
gRPC, without TLS or authentication: it listens on 127.0.0.1 unless ``host`` says otherwise.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import optuna
from omegaconf import DictConfig
from optuna.storages._grpc import servicer as optuna_servicer
from optuna.storages._grpc.auto_generated import api_pb2, api_pb2_grpc

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.errors import Interrupted
from qkvsearch.search.base.network import check_port, is_loopback
from qkvsearch.search.study.storage import open_storage, read_latest_studies, storage_url


class FinishedTrialsKept(optuna_servicer.OptunaStorageProxyService):
    """Optuna's proxy servicer, keeping each finished trial's message once it is built.

    A worker's client reads the whole study from the proxy when it starts, and the proxy
    builds a message of every trial for each such read (Optuna's ``_to_proto_trial``), one
    read after another: 64 workers starting together on a 10,000-trial study waited more
    than three minutes for their first trial (docs/clusters.md). A finished trial never
    changes (Optuna's own cache of the trials rests on that too), so its message is built
    once and kept encoded, as a one-trial reply (a quarter of the memory of the message
    object); a reply is the kept encodings joined and decoded as one (protobuf merges
    concatenated messages, appending their repeated fields). A running or queued trial is
    built anew each time. Deleting a study forgets every kept message (SQLite can reuse a
    deleted trial's id)."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        super().__init__(storage)
        self._kept: dict[int, bytes] = {}  # trial id: the finished trial as an encoded one-trial GetTrialsReply
        self._lock = threading.Lock()

    def _encoded(self, trial: optuna.trial.FrozenTrial) -> bytes:
        """The trial as an encoded one-trial reply: kept once built if it is finished."""
        kept = self._kept.get(trial._trial_id)
        if kept is not None:
            return kept
        encoded = api_pb2.GetTrialsReply(trials=[optuna_servicer._to_proto_trial(trial)]).SerializeToString()
        if trial.state.is_finished():
            with self._lock:
                self._kept[trial._trial_id] = encoded
        return encoded

    def warm(self, up_to: int) -> int:
        """Reads the latest studies (up to ``up_to`` trials) into the storage's cache and
        builds their finished trials' messages, as a server does in the background once it
        listens: the first worker of a large study does not wait for the read. Returns how
        many messages it built."""
        before = len(self._kept)
        for trials in read_latest_studies(self._backend, up_to):
            for trial in trials:
                if trial.state.is_finished():
                    self._encoded(trial)
        return len(self._kept) - before

    def GetTrials(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC's name)
        included, above = set(request.included_trial_ids), request.trial_id_greater_than
        try:
            trials = self._backend.get_all_trials(request.study_id, deepcopy=False)
        except KeyError as e:
            context.abort(code=grpc.StatusCode.NOT_FOUND, details=str(e))
        return api_pb2.GetTrialsReply.FromString(b"".join(
            self._encoded(t) for t in trials if t._trial_id > above or t._trial_id in included))

    def DeleteStudy(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (gRPC's name)
        with self._lock:
            self._kept.clear()
        return super().DeleteStudy(request, context)


#: trials the proxy reads in the background once it listens (the latest studies first)
WARM_TRIALS = 50_000


def make_server(storage: optuna.storages.BaseStorage, host: str, port: int,
                threads: int) -> tuple[grpc.Server, FinishedTrialsKept]:
    """Optuna's proxy server (``optuna.storages._grpc.server.make_server``), with
    :class:`FinishedTrialsKept` as its servicer (returned too, to be warmed)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    servicer = FinishedTrialsKept(storage)
    api_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    return server, servicer


def serve(cfg: DictConfig) -> None:
    """Serves ``cfg.storage`` (a database) over gRPC at ``cfg.host:cfg.port`` until stopped."""
    if cfg.storage.kind != "rdb":
        raise QkvError(f"storage.kind: the proxy serves a database (storage=postgres or sqlite), not {cfg.storage.kind!r}"
                       " (Optuna's proxy cannot serve a journal file)")
    threads = cfg.threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise QkvError(f"threads: {threads!r} is not a positive whole number of requests served at once")
    check_port(cfg.host, cfg.port)
    # Optuna's cache of finished trials in front of the database, as its own docs advise
    storage = optuna.storages.get_storage(open_storage(cfg.storage))
    if not is_loopback(cfg.host):
        print(f"qkv: warning: the storage proxy listens on {cfg.host}: anyone who reaches that address can read and "
              "change every study in the database (plain gRPC: no TLS, no authentication)", file=sys.stderr)
    print(f"storage proxy for {storage_url(cfg.storage)} at {cfg.host}:{cfg.port}; workers: "
          f"storage=grpc storage.host={cfg.host} storage.port={cfg.port} storage.url=<this database>", flush=True)
    server, servicer = make_server(storage, cfg.host, int(cfg.port), threads)
    try:
        server.start()
        threading.Thread(target=servicer.warm, args=(WARM_TRIALS,), daemon=True, name="proxy-warm").start()
        server.wait_for_termination()
    except (Interrupted, KeyboardInterrupt):  # Ctrl-C or SIGTERM is how a server is stopped
        print("storage proxy stopped", file=sys.stderr)
    finally:
        server.stop(grace=None)
