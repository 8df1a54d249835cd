"""The checks a server command makes of where it listens, before it starts: no heavy imports,
so ``qkv storage-proxy`` and ``qkv dashboard`` refuse a port in use at once."""

from __future__ import annotations

import errno
import ipaddress
import socket

from qkvsearch.models.errors import QkvError


def check_port(host: str, port: int) -> None:
    """Raises QkvError with a clear message when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise QkvError(f"port {port} on {host} is in use; choose another with port=N") from None
            raise QkvError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
