"""The cluster storage: PostgreSQL, started for real."""

from __future__ import annotations

import os
import subprocess
import time

import optuna
import pytest

from qkvsearch.search.inspect.selection import counted
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


def test_a_slot_lock_whose_session_the_server_ends_as_it_is_released_does_not_fail_the_worker(tmp_path, postgres_url):
    """The server can end the lock's session between the unlock and the connection's close
    (a restart, the OOM killer, an administrator): the lock went with the session, so the
    worker goes on. It used to fail with a traceback from rolling back the closed session
    (seen once in the outage test). Here the server itself ends the session, by its
    backend pid, right after the unlock."""
    import sqlalchemy

    from qkvsearch.search.study import storage as storage_module

    cfg = tiny_sweep_conf(tmp_path, "storage=postgres", f"storage.url={postgres_url}").storage
    open_storage(cfg)
    engine = storage_module._lock_engine(postgres_url)
    other = sqlalchemy.create_engine(postgres_url)
    ended = []

    def end_after_unlock(connection, _cursor, statement, *_):
        if "pg_advisory_unlock" in statement and not ended:
            pid = connection.connection.dbapi_connection.get_backend_pid()
            with other.connect() as admin:
                ended.append(admin.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar())
    sqlalchemy.event.listen(engine, "after_cursor_execute", end_after_unlock)
    try:
        with slot_lock(cfg, "ended-test"):
            pass
    finally:
        sqlalchemy.event.remove(engine, "after_cursor_execute", end_after_unlock)
        other.dispose()
    assert ended == [True]
    with slot_lock(cfg, "ended-test"):  # the next take opens a new session: the lock is free
        pass


@pytest.fixture
def own_cluster():
    """A server of this test's own, which it may stop and start."""
    from tests.search.postgres import Cluster

    if os.environ.get("QKV_TEST_POSTGRES_URL"):
        pytest.skip("restarts need a throwaway cluster, not QKV_TEST_POSTGRES_URL")
    cluster = Cluster()
    yield cluster
    cluster.remove()


def _workers(cluster, tmp_path, outages, n_trials=4):
    from tests.search.faults import FAST_HEARTBEAT, SHORT

    # open_wait_s: a worker still importing when the server goes down opens it during the
    # restart (as a SLURM job may); without it, a server never reached is an error at once
    args = [*SHORT, *FAST_HEARTBEAT, "trainer.max_steps=120", "storage=postgres", f"storage.url={cluster.url}",
            "storage.open_wait_s=120",
            "study_name=restart", f"n_trials={n_trials}", f"run_root={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return [subprocess.Popen([*SWEEP_CMD, *args, f"worker_index={i}", f"storage.outage_s={outage}", *TEST_SWEEP],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            for i, outage in enumerate(outages)]


def _mid_trial(cluster, worker=None):
    """Waits until a trial (of ``worker``'s process, when given) is mid-training."""
    from tests.search.faults import pid_of, running_mid_trial, wait_for

    def found():
        running = running_mid_trial(lambda: optuna.load_study(study_name="restart", storage=cluster.url))
        return [t for t in running if worker is None or pid_of(t) == worker.pid]

    return wait_for(found, 180, "a trial mid-training")


def test_workers_keep_their_trials_through_a_database_restart(own_cluster, tmp_path):
    workers = _workers(own_cluster, tmp_path, outages=[300, 300])
    _mid_trial(own_cluster)
    own_cluster.stop()  # the database shuts down under running trials: their reports, heartbeats and tells fail
    time.sleep(5)
    own_cluster.start()
    errors = [proc.communicate(timeout=600)[1] for proc in workers]
    assert [proc.returncode for proc in workers] == [0, 0], "\n".join(e[-2000:] for e in errors)
    assert "connection lost" in "".join(errors) and "connection back" in "".join(errors)
    trials = optuna.load_study(study_name="restart", storage=own_cluster.url).get_trials()
    assert not [t for t in trials if not t.state.is_finished()]
    assert len(counted(trials)) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted(trials))


def test_a_worker_whose_outage_runs_out_stops_with_one_line_and_the_others_retry_its_trial(own_cluster, tmp_path):
    workers = _workers(own_cluster, tmp_path, outages=[2, 300])
    _mid_trial(own_cluster, workers[0])  # the worker that will give up holds a trial
    own_cluster.stop()
    time.sleep(8)
    own_cluster.start()
    impatient, patient = workers
    _, err = impatient.communicate(timeout=120)
    assert impatient.returncode == 75
    assert [line for line in err.splitlines() if "qkv sweep: error:" in line] == [next(
        line for line in err.splitlines() if line.startswith("qkv sweep: error: storage"))]
    assert "unreachable for" in err and "this worker stops" in err and "Traceback" not in err
    _, err = patient.communicate(timeout=600)
    assert patient.returncode == 0, err[-2000:]
    trials = optuna.load_study(study_name="restart", storage=own_cluster.url).get_trials()
    assert not [t for t in trials if not t.state.is_finished()] and len(counted(trials)) == 4
    lost = [t for t in trials if "worker lost" in t.user_attrs.get("fail_reason", "")]
    assert lost and all(any(r.user_attrs.get("retry_of") == t.number for r in trials) for t in lost)
