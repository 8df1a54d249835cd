"""Ctrl-C and a scheduler's SIGTERM: where they may stop a command.

The CLI's handler raises :class:`Interrupted` at once, wherever the main thread is. That is
right for a server or a Trainer, but a sweep writes to its study's storage all the time, and
an exception raised in the middle of a SQLite commit leaves the database's write lock held:
the other workers' heartbeats then find the database locked and cannot record their own
interrupted trials. Inside :func:`deferred`, a first signal is only noted, and
:func:`check` raises it where stopping is safe: between training steps, between validation
batches, in the waits between trials (:func:`pause`). A second signal raises at once, for
a user who does not want to wait for the step in flight.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from qkvsearch.search.base.errors import Interrupted


class _State:
    deferring = False
    pending: int | None = None


def on_signal(signum: int, frame: object) -> None:
    """The CLI's handler of SIGINT and SIGTERM."""
    if _State.deferring and _State.pending is None:
        _State.pending = signum
        return
    _State.pending = None  # raised now: the noted one with it
    raise Interrupted(signum)


def check() -> None:
    """Raises the signal noted since :func:`deferred` began (or since the last raise), if any."""
    if _State.pending is not None:
        signum, _State.pending = _State.pending, None
        raise Interrupted(signum)


def pause(seconds: float, slice_s: float = 0.1) -> None:
    """``time.sleep(seconds)`` that a noted signal ends within ``slice_s``."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        check()
        time.sleep(min(slice_s, left))
    check()


def backoff(most: float, first: float = 0.5) -> Iterator[float]:
    """Waits between looks at the study: ``first`` seconds, then twice as long each time up
    to ``most``. A wait that ends soon ends within a second; a long one costs the storage
    one read per ``most`` seconds."""
    wait = min(first, most)
    while True:
        yield wait
        wait = min(2 * wait, most)


#: what a sweep takes over (with Ctrl-C, which the CLI handles): a scheduler's SIGTERM, and
#: the SIGUSR2 that submitit asks SLURM to send before a job's time limit
TAKEN_OVER = (signal.SIGTERM, signal.SIGUSR2)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within, a first signal waits for the next :func:`check`; one noted after the last
    check is raised on the way out.

    SIGTERM and SIGUSR2 are handled here too for the block, also where the process did not
    start from the CLI (a submitit job runs the sweep in its own process): the running
    trial is recorded as interrupted first, and then the handler that was there before
    (submitit's, which requeues the job and exits) gets the signal.
    """
    if _State.deferring:  # nested: the outer one decides
        yield
        return
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in TAKEN_OVER:
            previous[signum] = signal.signal(signum, on_signal)
    _State.deferring, _State.pending = True, None
    try:
        yield
        check()
    except Interrupted as error:
        _State.deferring = False
        handler = previous.get(error.signum)
        if callable(handler) and handler is not on_signal:
            handler(error.signum, None)  # the trial is recorded: now what the process did before
        raise
    finally:
        _State.deferring, _State.pending = False, None
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
