"""Ctrl-C on one worker (test_faults.py and test_worker_group.py cover several processes on one
study, test_slurm.py a submitit multirun on a real SLURM)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import optuna
import pytest

from qkvsearch.search.base.keys import RETRY_OF
from qkvsearch.search.inspect.selection import counted
from tests.conftest import SWEEP_CMD, TEST_SWEEP, tiny_sweep_conf

State = optuna.trial.TrialState
pytestmark = pytest.mark.slow

COMMON = [
    "task=recall", "task.data.n_train=512", "task.data.n_val=128", "task.data.n_pairs=4",
    "trainer.max_steps=30", "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "pruner=none",
]


def _qkv(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*SWEEP_CMD, *args, *TEST_SWEEP], env=env, **kwargs)


def test_ctrl_c_records_the_running_trial_as_failed_and_the_study_resumes(tmp_path):
    args = [*COMMON, f"run_root={tmp_path}", "n_trials=3", "trainer.max_steps=100000", "trainer.val_check_interval=5"]
    proc = _qkv(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cfg = tiny_sweep_conf(tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name=cfg.study_name, storage=str(cfg.storage.url))
            running = study.get_trials(states=(State.RUNNING,))
            if running and running[0].intermediate_values:
                break
        except Exception:  # noqa: BLE001 - neither the database nor the study may exist yet
            pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err.decode(), err.decode()[-2000:]
    trials = optuna.load_study(study_name=cfg.study_name, storage=str(cfg.storage.url)).get_trials()
    assert [t.state for t in trials] == [State.FAIL, State.WAITING]  # the interrupted trial, and its retry queued
    assert trials[0].user_attrs["fail_reason"].startswith("interrupted (SIGINT)")
    assert trials[1].user_attrs[RETRY_OF] == 0 and trials[1].params == trials[0].params
    resumed = _qkv(*[a for a in args if "max_steps" not in a and "val_check" not in a], "trainer.max_steps=30",
                   "trainer.val_check_interval=10", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    trials = optuna.load_study(study_name=cfg.study_name, storage=str(cfg.storage.url)).get_trials()
    assert len(trials) == 4 and trials[0].state == State.FAIL and all(t.state.is_finished() for t in trials)
    assert len(counted(trials)) == 3 and trials[1].state == State.COMPLETE  # the interrupted one trained after all


def test_waits_for_other_workers_back_off_from_half_a_second_to_the_poll_interval():
    import itertools

    from qkvsearch.search.base.signals import backoff

    assert list(itertools.islice(backoff(30.0), 8)) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert list(itertools.islice(backoff(0.2), 2)) == [0.2, 0.2]
