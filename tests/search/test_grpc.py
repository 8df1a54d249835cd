"""``storage=grpc``: workers that reach their PostgreSQL study through Optuna's gRPC storage
proxy (``qkv storage-proxy``), started for real; the proxy killed -9 and started again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest

from qkvsearch.search.inspect.selection import counted
from tests.conftest import TEST_SWEEP
from tests.search.faults import FAST_HEARTBEAT, SHORT, qkv, running_mid_trial, wait_for

pytest.importorskip("grpc")
State = optuna.trial.TrialState
QKV = [sys.executable, "-m", "qkvsearch.search.cli"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _proxy(url: str, port: int) -> subprocess.Popen:
    """``qkv storage-proxy`` in its own process; returns once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*QKV, "storage-proxy", f"storage.url={url}", f"port={port}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert f"storage proxy for {url} at 127.0.0.1:{port}" in line, line + proc.stdout.read()
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    raise AssertionError("the proxy never listened")


@pytest.fixture
def proxies():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_workers_through_the_proxy_finish_exactly_n_trials_across_a_kill_9_of_the_proxy(tmp_path, postgres_url, proxies):
    port, name = _free_port(), f"grpc-{tmp_path.name[-6:]}"
    proxies.append(_proxy(postgres_url, port))
    args = [*SHORT, *FAST_HEARTBEAT, "trainer.max_steps=100", "storage=grpc", f"storage.port={port}",
            f"storage.url={postgres_url}", "storage.open_wait_s=120", f"study_name={name}", "n_trials=4", f"run_root={tmp_path}", *TEST_SWEEP]
    workers = [qkv(*args, f"worker_index={i}", log=tmp_path / f"w{i}.log") for i in range(2)]

    def load() -> optuna.Study:
        return optuna.load_study(study_name=name, storage=postgres_url)  # the database itself, beside the proxy

    wait_for(lambda: _loaded(lambda: running_mid_trial(load)), 240, "a trial mid-training")
    proxies[0].send_signal(signal.SIGKILL)  # the proxy dies under running trials: their reports and heartbeats fail
    proxies[0].wait()
    time.sleep(3)
    proxies.append(_proxy(postgres_url, port))
    for proc in workers:
        assert proc.wait(timeout=400) == 0, (tmp_path / "w0.log").read_text()[-2000:] + (tmp_path / "w1.log").read_text()[-2000:]
    logs = (tmp_path / "w0.log").read_text() + (tmp_path / "w1.log").read_text()
    assert "connection lost" in logs and "connection back" in logs and "Traceback" not in logs
    trials = load().get_trials()
    assert not [t for t in trials if not t.state.is_finished()]
    assert len(counted(trials)) == 4 and all(t.state == State.COMPLETE for t in counted(trials)), [
        (t.number, t.state, t.user_attrs.get("fail_reason"), t.user_attrs.get("pruned_reason")) for t in trials]
    assert {t.user_attrs["worker_index"] for t in trials} == {0, 1}  # both workers trained through the proxy


def _loaded(find):
    try:
        return find()
    except KeyError:  # the study is not there yet
        return []


def test_no_proxy_there_is_one_clear_line_before_anything_runs(tmp_path, postgres_url):
    port = _free_port()
    result = subprocess.run([*QKV, "sweep", "storage=grpc", f"storage.port={port}", f"storage.url={postgres_url}",
                             f"run_root={tmp_path}", *TEST_SWEEP], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot open storage grpc://127.0.0.1:{port}: no storage proxy answers there" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "workers").exists()


def test_the_proxy_refuses_a_journal_and_a_port_in_use_in_one_line(tmp_path):
    journal = subprocess.run([*QKV, "storage-proxy", "storage=journal", f"storage.path={tmp_path}/j.log"],
                             capture_output=True, text=True, timeout=120)
    assert journal.returncode == 2 and "the proxy serves a database" in journal.stderr and "journal" in journal.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([*QKV, "storage-proxy", f"storage.url=sqlite:///{tmp_path}/s.db", f"port={port}"],
                              capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in busy.stderr


def _fields(t: optuna.trial.FrozenTrial) -> tuple:
    """What a trial read through the proxy must carry, to compare two reads."""
    return (t._trial_id, t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
            t.intermediate_values, t.datetime_start, t.datetime_complete)


def test_the_proxy_builds_a_finished_trials_message_once_and_sends_what_changed_as_it_is_now(tmp_path, monkeypatch):
    """Every worker's client reads the whole study from the proxy when it starts: a finished
    trial (it never changes) is built into its message once, not once per reading client;
    an open trial is built each time, so its end reaches a client that reads after it."""
    from optuna.storages._grpc import servicer as optuna_servicer

    from qkvsearch.search.commands.proxy import make_server

    backend = optuna.storages.get_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(storage=backend, study_name="kept")
    for i in range(6):
        trial = study.ask()
        trial.suggest_int("n_layers", 1, 4)
        trial.set_user_attr("arch", {"n_layers": i})
        trial.report(0.5 * i, step=10)
        study.tell(trial, float(i))
    running = study.ask()
    running.suggest_int("n_layers", 1, 4)
    built: list[int] = []
    real = optuna_servicer._to_proto_trial

    def counted_build(trial):
        built.append(trial.number)
        return real(trial)
    monkeypatch.setattr(optuna_servicer, "_to_proto_trial", counted_build)
    port = _free_port()
    server, _ = make_server(backend, "127.0.0.1", port, threads=2)
    server.start()
    try:
        def client_read() -> list[optuna.trial.FrozenTrial]:
            client = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port)
            try:
                return client.get_all_trials(client.get_study_id_from_name("kept"))
            finally:
                client.close()
        first = client_read()
        assert sorted(built) == list(range(7))
        assert [_fields(t) for t in first] == [_fields(t) for t in backend.get_all_trials(study._study_id)]
        built.clear()
        second = client_read()
        assert built == [6]  # only the running trial is built again
        assert [_fields(t) for t in second] == [_fields(t) for t in first]
        study.tell(running, 9.0)
        built.clear()
        third = client_read()
        assert third[6].state == State.COMPLETE and third[6].value == 9.0 and built == [6]
        built.clear()
        assert client_read()[6].value == 9.0 and built == []  # now kept like the others
    finally:
        server.stop(grace=None)
    port = _free_port()  # a proxy started anew builds the latest studies' messages before any worker asks
    server, servicer = make_server(backend, "127.0.0.1", port, threads=2)
    assert servicer.warm(up_to=6) == 0 and built == []  # a study larger than the budget is left to its first read
    assert servicer.warm(up_to=100) == 7 and sorted(built) == list(range(7))
    server.start()
    try:
        built.clear()
        assert [_fields(t) for t in client_read()] == [_fields(t) for t in third] and built == []
    finally:
        server.stop(grace=None)


def test_a_workers_proxy_client_builds_the_same_trials_as_optunas_decoding_each_repeated_text_once(tmp_path):
    """The client every ``storage=grpc`` worker opens builds each read's trials with each
    distinct distribution and scalar decoded once: the trials equal those of Optuna's own
    client, field by field, a list or dict attribute is each trial's own, and the client
    keeps its cache once pickled (Optuna's rebuilds it then)."""
    import pickle

    from qkvsearch.search.commands.proxy import make_server
    from qkvsearch.search.study.proxy_client import DecodedOnceCache, DecodedOnceProxy

    backend = optuna.storages.get_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(storage=backend, study_name="decoded")
    for i in range(8):
        trial = study.ask()
        trial.suggest_int("n_layers", 1, 4)
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("norm", ["layer", "rms", None])
        trial.set_user_attr("arch", {"n_layers": i % 2, "heads": [2, 4]})
        trial.set_user_attr("host", "node-1")
        trial.set_user_attr("tokens", [i, i + 1])
        trial.set_user_attr("note", None)
        trial.storage.set_trial_system_attr(trial._trial_id, "qkv:heartbeat", 1.5 * (i % 3))
        trial.report(0.25 * i, step=10)
        trial.report(0.5, step=20)
        if i == 7:
            continue  # left running
        study.tell(trial, *([float(i)] if i % 3 == 1 else []), state=[State.PRUNED, State.COMPLETE, State.FAIL][i % 3])
    study.enqueue_trial({"n_layers": 2})
    port = _free_port()
    server, _ = make_server(backend, "127.0.0.1", port, threads=2)
    server.start()
    try:
        theirs = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port)
        ours = DecodedOnceProxy(host="127.0.0.1", port=port)
        study_id = ours.get_study_id_from_name("decoded")

        expected, got = theirs.get_all_trials(study_id), ours.get_all_trials(study_id, deepcopy=False)
        assert {t.state for t in got} == {State.PRUNED, State.COMPLETE, State.FAIL, State.RUNNING, State.WAITING}
        assert [_fields(t) for t in got] == [_fields(t) for t in expected]
        assert got[0].distributions["lr"] is got[1].distributions["lr"]  # decoded once per read
        got[0].user_attrs["tokens"].append(99)
        got[0].user_attrs["arch"]["heads"].append(8)
        assert got[2].user_attrs["arch"] == {"n_layers": 0, "heads": [2, 4]} and got[1].user_attrs["tokens"] == [1, 2]
        study.tell(7, 7.0)  # the running trial ends: the next read brings it, as Optuna's would
        again = pickle.loads(pickle.dumps(ours))
        assert isinstance(again._cache, DecodedOnceCache)
        assert [_fields(t) for t in again.get_all_trials(study_id)] == [_fields(t) for t in theirs.get_all_trials(study_id)]
        assert ours.get_all_trials(study_id)[7].values == [7.0]
        with pytest.raises(KeyError):
            ours.get_all_trials(study_id + 1)
        for client in (theirs, ours, again):
            client.close()
    finally:
        server.stop(grace=None)


def test_a_proxy_whose_database_cannot_list_its_studies_starts_without_its_warm_up(tmp_path):
    """The warm-up is a background nicety: a storage that fails to list its studies (here a
    database whose studies table is gone) leaves it with nothing read, not a dead thread's
    traceback; the requests' own reads say what is wrong."""
    import sqlite3

    from qkvsearch.search.commands.proxy import make_server

    backend = optuna.storages.get_storage(f"sqlite:///{tmp_path}/s.db")
    optuna.create_study(storage=backend, study_name="gone").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with sqlite3.connect(tmp_path / "s.db") as connection:
        connection.execute("PRAGMA foreign_keys = OFF")
        connection.execute("DROP TABLE study_directions")
        connection.execute("DROP TABLE studies")
    with pytest.raises(optuna.exceptions.StorageInternalError):  # Optuna's wrapping of "no such table"
        backend.get_all_studies()
    _, servicer = make_server(backend, "127.0.0.1", _free_port(), threads=1)
    assert servicer.warm(up_to=100) == 0
