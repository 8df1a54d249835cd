"""What processes of one sweep share outside Python: environment variables, Hydra's flags,
and the link of an extra process to the one that started it. Light on purpose (the
command line reads it before anything heavy is imported)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import signal
import sys

#: Set in an extra worker's (or helper rank's) environment to the pid of the process that started it.
SPAWNED_BY = "QKV_SPAWNED_BY"
#: The environment variable that pins a worker to its GPU(s).
VISIBLE = "CUDA_VISIBLE_DEVICES"
#: Hydra's flags that add a folder of configs (its options are then not only ours).
CONFIG_DIR_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp")
#: Hydra's flags that say where configs are found: an extra worker gets them too.
CONFIG_FLAGS = (*CONFIG_DIR_FLAGS, "--config-name", "-cn")
#: All of Hydra's own flags that take a value (they are not overrides).
VALUE_FLAGS = (*CONFIG_FLAGS, "--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun")
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a process another started (``SPAWNED_BY``): SIGTERM when that one dies (Linux)."""
    parent = os.environ.get(SPAWNED_BY)
    if parent is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def tail(path: pathlib.Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('(no log)' when it cannot be read)."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"
