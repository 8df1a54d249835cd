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
from concurrent.futures import ThreadPoolExecutor

import optuna
from omegaconf import DictConfig

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.errors import Interrupted
from qkvsearch.search.base.network import check_port, is_loopback
from qkvsearch.search.study.storage import open_storage, storage_url


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
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=cfg.host, port=int(cfg.port),
                                              thread_pool=ThreadPoolExecutor(max_workers=threads))
    except (Interrupted, KeyboardInterrupt):  # Ctrl-C or SIGTERM is how a server is stopped
        print("storage proxy stopped", file=sys.stderr)
