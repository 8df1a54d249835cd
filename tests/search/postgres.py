"""A throwaway PostgreSQL cluster on 127.0.0.1 for the tests that need a real server."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(args: list[str]) -> list[str]:
    """Runs a server tool as the postgres user when we are root (initdb refuses root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class Cluster:
    """A throwaway cluster in a temporary folder, on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.bin_dir = _bin_dir()
        if self.bin_dir is None:
            if os.environ.get("QKV_REQUIRE_SERVICES"):
                pytest.fail("QKV_REQUIRE_SERVICES is set but PostgreSQL server binaries are missing")
            pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
        self.root = tempfile.mkdtemp(prefix="qkv-pg-")
        self.data = os.path.join(self.root, "data")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = _free_port()
        subprocess.run(_as_postgres([f"{self.bin_dir}/initdb", "-D", self.data, "-U", "qkv", "--auth=trust", "-E", "UTF8"]),
                       check=True, capture_output=True)
        self.start()
        subprocess.run(_as_postgres([f"{self.bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "qkv", "qkv"]),
                       check=True, capture_output=True)
        self.url = f"postgresql+psycopg2://qkv@127.0.0.1:{self.port}/qkv"

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} -c fsync=off"
        subprocess.run(_as_postgres([f"{self.bin_dir}/pg_ctl", "-D", self.data, "-o", options, "-l",
                                     os.path.join(self.root, "log"), "-w", "start"]), check=True, capture_output=True)
        for _ in range(50):
            if subprocess.run([f"{self.bin_dir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stops the server (``fast``: sessions are cut, as in a restart; ``immediate``: a crash)."""
        subprocess.run(_as_postgres([f"{self.bin_dir}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"]), capture_output=True)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_cluster() -> Iterator[str]:
    """Starts a cluster in a temporary folder; yields a SQLAlchemy URL; stops and removes it."""
    url = os.environ.get("QKV_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    cluster = Cluster()
    try:
        yield cluster.url
    finally:
        cluster.remove()
