"""``qkv dashboard``: the real optuna-dashboard on a sweep's storage, bound to loopback."""

from __future__ import annotations

import errno
import pathlib
import socket
import sys

import hydra
import optuna
from omegaconf import DictConfig

from search.artifacts import open_store
from search.configs import run_command
from search.storage import open_storage, storage_url


def check_port(host: str, port: int) -> None:
    """Raises OSError with a clear message when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise OSError(f"port {port} on {host} is in use; choose another with port=N") from None
            raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def serve(cfg: DictConfig) -> None:
    """Checks the storage and the port, then serves until interrupted."""
    import optuna_dashboard

    storage = open_storage(cfg.storage)
    studies = optuna.get_all_study_summaries(storage)
    if not studies:
        raise ValueError(f"no study found in {storage_url(cfg.storage)}; run `qkv sweep` first, or give storage=...")
    check_port(cfg.host, cfg.port)
    store = open_store(cfg.artifacts) if cfg.artifacts and pathlib.Path(cfg.artifacts).exists() else None
    names = ", ".join(s.study_name for s in studies)
    print(f"optuna-dashboard for {storage_url(cfg.storage)} ({names}) at http://{cfg.host}:{cfg.port}/dashboard", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=cfg.host, port=cfg.port, artifact_store=store)
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)


@hydra.main(version_base="1.3", config_path="../conf", config_name="dashboard")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv dashboard``."""
    run_command(serve, cfg)
