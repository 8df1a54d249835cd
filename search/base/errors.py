"""Exceptions shared by the commands (kept free of heavy imports: the CLI loads this first)."""

from __future__ import annotations

import signal


class Interrupted(BaseException):
    """Ctrl-C or a scheduler's signal; ``signum`` says which.

    Not a KeyboardInterrupt, on purpose: Lightning's ``fit`` turns that into
    ``sys.exit(1)`` and the signal is lost, while any other BaseException it re-raises
    after its teardown.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StorageUnreachable(BaseException):  # noqa: N818 - what it says is the point
    """The study's storage stayed unreachable past ``storage.outage_s``: the worker stops (a
    BaseException, so no trial takes it for its own failure) with one line."""
