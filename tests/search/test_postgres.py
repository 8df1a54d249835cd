"""The cluster storage: PostgreSQL, started for real."""

from __future__ import annotations

import os
import subprocess

import optuna
import pytest

from qkvsearch.search.study.storage import open_storage, slot_lock
from qkvsearch.search.study.sweep import sweep
from tests.conftest import SWEEP_CMD, TEST_SWEEP, tiny_sweep_conf

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_a_sweep_on_postgres_leaves_trials_plain_optuna_reads(tmp_path, postgres_url):
    cfg = tiny_sweep_conf(tmp_path, "storage=postgres", f"storage.url={postgres_url}", "study_name=pg-sweep", "n_trials=2")
    sweep(cfg)
    study = optuna.load_study(study_name="pg-sweep", storage=postgres_url)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 2


def test_two_workers_on_postgres_finish_exactly_n_trials(tmp_path, postgres_url):
    args = [
        "task=recall", "task.data.n_train=512", "task.data.n_val=128", "task.data.n_pairs=4", "trainer.max_steps=30",
        "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "storage=postgres", f"storage.url={postgres_url}",
        "study_name=pg-two", "n_trials=5", f"run_root={tmp_path}",
    ]
    procs = [
        subprocess.Popen([*SWEEP_CMD, *args, f"worker_index={i}", *TEST_SWEEP],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    trials = optuna.load_study(study_name="pg-two", storage=postgres_url).get_trials()
    assert sorted(t.number for t in trials) == list(range(5))
    assert all(t.state.is_finished() for t in trials)


def test_the_advisory_slot_lock_excludes_a_second_holder(tmp_path, postgres_url):
    import threading

    cfg = tiny_sweep_conf(tmp_path, "storage=postgres", f"storage.url={postgres_url}").storage
    open_storage(cfg)
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        entered.wait()
        with slot_lock(cfg, "lock-test"):
            order.append("second")

    thread = threading.Thread(target=second)
    with slot_lock(cfg, "lock-test"):
        thread.start()
        entered.set()
        thread.join(timeout=1.0)
        assert thread.is_alive(), "the second holder entered while the first held the lock"
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]
