"""Helpers of the fault tests: real `qkv sweep` processes, killed the way the world kills them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import time
from collections.abc import Callable

import optuna

from tests.conftest import SWEEP_CMD, TEST_SWEEP

State = optuna.trial.TrialState
#: Short trials on the recall task, seconds each on this machine; no pruning, so a trial
#: ends only by finishing, failing or being killed.
SHORT = [
    "task=recall", "task.data.n_train=512", "task.data.n_val=128", "task.data.n_pairs=4",
    "trainer.max_steps=80", "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "pruner=none",
]
#: Heartbeats every second, a dead worker's trial failed after 3 s of silence.
FAST_HEARTBEAT = ["storage.heartbeat_s=1", "storage.grace_s=3"]


def qkv(*args: str, log: pathlib.Path | None = None, new_session: bool = False, **kwargs) -> subprocess.Popen:
    """Starts ``qkv sweep ARGS`` as a separate process (output to ``log`` when given)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if log is not None:
        kwargs.setdefault("stdout", open(log, "ab"))  # noqa: SIM115 - the child owns it
        kwargs.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen([*SWEEP_CMD, *args, *TEST_SWEEP], env=env,
                            start_new_session=new_session, **kwargs)


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2) -> object:
    """Polls ``condition`` until it returns something truthy; fails the test after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            found = condition()
        except Exception:  # noqa: BLE001 - the storage or study may not exist yet
            found = None
        if found:
            return found
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def running_mid_trial(study_loader: Callable[[], optuna.Study]) -> list[optuna.trial.FrozenTrial]:
    """Running trials that have reported at least one validation (so they are mid-training)."""
    return [t for t in study_loader().get_trials(deepcopy=False, states=(State.RUNNING,)) if t.intermediate_values]


def pid_of(trial: optuna.trial.FrozenTrial) -> int:
    """The pid of the process that runs ``trial`` (its ``worker`` attribute is host:pid)."""
    return int(trial.user_attrs["worker"].rsplit(":", 1)[1])
