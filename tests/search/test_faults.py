"""Workers that die, restart or start twice, on every storage: no trial lost, no slot stuck.

Workers are real `qkv sweep` processes killed with SIGKILL (what the kernel's OOM killer
sends too), SIGTERM (a scheduler) and a process-group SIGINT (a terminal's Ctrl-C).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest

from qkvsearch.search.base.keys import RETRY_OF
from qkvsearch.search.inspect.selection import counted, retried_numbers
from qkvsearch.search.study.storage import HEARTBEAT_ATTR, open_storage
from tests.conftest import SWEEP_CMD, TEST_SWEEP, compose_conf
from tests.search.faults import FAST_HEARTBEAT, SHORT, State, pid_of, qkv, running_mid_trial, wait_for

pytestmark = pytest.mark.slow


def _storage_args(kind: str, tmp_path, postgres_url: str | None) -> tuple[list[str], str]:
    """The overrides for one storage kind, and what ``optuna.load_study`` opens."""
    if kind == "sqlite":
        return [], f"sqlite:///{tmp_path}/studies.db"
    if kind == "journal":
        return ["storage=journal"], str(tmp_path / "studies.journal")
    return ["storage=postgres", f"storage.url={postgres_url}"], postgres_url


def _open(kind: str, where: str, name: str) -> optuna.Study:
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(JournalFileBackend(where)))
    return optuna.load_study(study_name=name, storage=where)


def _assert_complete_without_loss(study: optuna.Study, n_trials: int, killed: set[int]) -> None:
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (State.RUNNING, State.WAITING)]
    assert len(counted(trials)) == n_trials
    retried = retried_numbers(trials)
    assert killed <= retried, f"killed trials {sorted(killed - retried)} were never retried"
    # a killed trial was failed by another worker, which said why and by which trial it is retried, once
    for t in trials:
        if t.number in killed:
            retry = next(r.number for r in trials if r.user_attrs.get(RETRY_OF) == t.number)
            assert t.state == State.FAIL and re.fullmatch(
                rf"worker lost: no heartbeat( ever)? for \d+ s \(grace 3 s\); retried as trial {retry}", t.user_attrs["fail_reason"])
    assert all(sum(t.user_attrs.get(RETRY_OF) == k for t in trials) == 1 for k in killed)
    # every counted trial trained to its end (no genuine failure happens here)
    assert all(t.state == State.COMPLETE for t in counted(trials))
    by_number = {t.number: t for t in trials}
    for t in trials:
        if RETRY_OF in t.user_attrs:
            original = by_number[t.user_attrs[RETRY_OF]]
            assert t.params == original.params, "a retry must train the same architecture"


# On the server a cluster shares: its cost is six processes, and the kill -9 paths of SQLite
# and the journal file are the heartbeat-window test's (on all three storages) and test_workers'
def test_three_workers_killed_at_random_still_finish_exactly_n_trials(tmp_path, postgres_url):
    import sqlalchemy

    kind = "postgres"
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:  # a fresh database per run of this test
        connection.execute(sqlalchemy.text("DROP DATABASE IF EXISTS faults"))
        connection.execute(sqlalchemy.text("CREATE DATABASE faults"))
    engine.dispose()
    postgres_url = postgres_url.rsplit("/", 1)[0] + "/faults"
    storage_args, where = _storage_args(kind, tmp_path, postgres_url)
    n_trials, name = 6, "faults"
    args = [*SHORT, *FAST_HEARTBEAT, *storage_args, f"run_root={tmp_path}", f"n_trials={n_trials}",
            f"study_name={name}", "max_retries=3", "sampler=random"]
    log = tmp_path / "workers.log"
    workers = [qkv(*args, log=log) for _ in range(3)]
    rng = random.Random(0)
    killed: set[int] = set()
    for _ in range(2):  # two kills, each mid-trial, each followed by a replacement worker
        alive = {p.pid: p for p in workers if p.poll() is None}
        running = wait_for(
            lambda alive=alive: [t for t in running_mid_trial(lambda: _open(kind, where, name)) if pid_of(t) in alive],
            180, "a live worker mid-trial",
        )
        victim = rng.choice(running)
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(pid_of(victim), signal.SIGKILL)
        alive[pid_of(victim)].wait(timeout=30)
        killed.add(victim.number)
        workers.append(qkv(*args, log=log))
    for proc in workers:
        proc.wait(timeout=300)
    assert [p.returncode for p in workers].count(-signal.SIGKILL) == 2
    assert all(p.returncode in (0, -signal.SIGKILL) for p in workers), log.read_text()[-3000:]
    study = _open(kind, where, name)
    _assert_complete_without_loss(study, n_trials, killed)
    before = len(study.get_trials())
    resumed = qkv(*args, log=log)
    assert resumed.wait(timeout=120) == 0
    assert len(_open(kind, where, name).get_trials()) == before, "the resumed command trained more"


def test_ctrl_c_on_a_worker_group_stops_once_cleanly_and_the_trials_are_retried(tmp_path):
    args = [*SHORT, f"run_root={tmp_path}", "n_trials=3", "study_name=ctrlc", "workers=3", "trainer.max_steps=100000"]
    main = qkv(*args, new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    load = lambda: optuna.load_study(study_name="ctrlc", storage=f"sqlite:///{tmp_path}/studies.db")  # noqa: E731
    wait_for(lambda: len(running_mid_trial(load)) == 3, 180, "three workers mid-trial")
    running = running_mid_trial(load)
    worker_pids = {pid_of(t) for t in running} - {main.pid}
    assert len(worker_pids) == 2
    # the extra workers are in sessions of their own: a terminal's Ctrl-C reaches only the first process
    assert all(os.getsid(pid) != os.getsid(main.pid) for pid in worker_pids)
    os.killpg(main.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    out, err = main.communicate(timeout=120)
    assert main.returncode == 130, err.decode()[-3000:]
    assert "Traceback" not in err.decode()
    for log in (tmp_path / "workers" / "ctrlc").glob("worker-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    trials = load().get_trials()
    interrupted = [t for t in trials if t.state == State.FAIL]
    assert sorted(t.number for t in interrupted) == sorted(t.number for t in running)
    assert all(t.user_attrs["fail_reason"].startswith("interrupted (SIGINT)") for t in interrupted)
    waiting = [t for t in trials if t.state == State.WAITING]
    assert sorted(t.user_attrs[RETRY_OF] for t in waiting) == sorted(t.number for t in running)  # one retry each
    resumed = qkv(*[a for a in args if "max_steps" not in a and "workers" not in a], "trainer.max_steps=30",
                  log=tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    trials = load().get_trials()
    assert len(counted(trials)) == 3 and not [t for t in trials if not t.state.is_finished()]
    assert {t.user_attrs.get(RETRY_OF) for t in trials if t.state == State.COMPLETE} >= {t.number for t in running}


def test_workers_end_with_their_parent_when_it_is_killed(tmp_path):
    args = [*SHORT, f"run_root={tmp_path}", "n_trials=4", "study_name=orphans", "workers=2", "trainer.max_steps=100000"]
    main = qkv(*args, new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load = lambda: optuna.load_study(study_name="orphans", storage=f"sqlite:///{tmp_path}/studies.db")  # noqa: E731
    wait_for(lambda: len(running_mid_trial(load)) == 2, 180, "both workers mid-trial")
    worker = next(pid_of(t) for t in running_mid_trial(load) if pid_of(t) != main.pid)
    main.kill()  # what the OOM killer does to the first process
    main.wait(timeout=30)
    wait_for(lambda: not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z",
             60, "the extra worker to end with its parent")
    mine = next(t for t in load().get_trials() if t.user_attrs.get("worker", "").endswith(f":{worker}"))
    assert mine.state == State.FAIL and mine.user_attrs["fail_reason"].startswith("interrupted (SIGTERM)")
    assert any(t.user_attrs.get(RETRY_OF) == mine.number for t in load().get_trials())


TAKE_AND_DIE = """
import os, signal, sys
from qkvsearch.search.base.configs import compose_config
from qkvsearch.search.study.prepare import prepare
from qkvsearch.search.study.storage import slot_lock
from qkvsearch.search.study.workers import take_slot
cfg = compose_config("sweep", sys.argv[1:])
worker = prepare(cfg).worker
with slot_lock(cfg.storage, cfg.study_name):
    take_slot(worker.study, cfg.n_trials)  # a trial taken, as a worker takes it
    os.kill(os.getpid(), signal.SIGKILL)  # and the worker killed before its first heartbeat
"""


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgres"])
def test_a_worker_killed_between_taking_a_trial_and_its_first_heartbeat_holds_no_slot(kind, tmp_path, request):
    postgres_url = request.getfixturevalue("postgres_url") if kind == "postgres" else None
    storage_args, where = _storage_args(kind, tmp_path, postgres_url)
    name = f"window-{tmp_path.name}"[:100]
    args = [*SHORT, *FAST_HEARTBEAT, *storage_args, f"run_root={tmp_path}", "n_trials=2", f"study_name={name}",
            "trainer.max_steps=20", *TEST_SWEEP]
    died = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, *args], capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    (orphan,) = _open(kind, where, name).get_trials()
    assert orphan.state == State.RUNNING and HEARTBEAT_ATTR not in orphan.system_attrs  # what the kill left
    worker = qkv(*args, log=tmp_path / "worker.log")
    assert worker.wait(timeout=180) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    trials = _open(kind, where, name).get_trials()
    assert not [t for t in trials if t.state == State.RUNNING] and len(counted(trials)) == 2
    assert trials[0].state == State.FAIL and trials[0].user_attrs["fail_reason"].startswith("worker lost: no heartbeat ever")
    assert sum(t.user_attrs.get(RETRY_OF) == 0 for t in trials) == 1


@pytest.fixture
def zone(request, monkeypatch):
    """The process's local time zone set to ``request.param`` (a POSIX TZ string), then back."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("zone", ["UTC0", "IST-5:30"], indirect=True)  # a database keeps a trial's start in UTC
@pytest.mark.parametrize("storage_name", ["sqlite", "journal"])
def test_a_silent_trial_and_one_that_never_beat_are_failed_with_why_and_retried(storage_name, zone, tmp_path):
    """A worker killed mid-trial stops beating; one killed between taking its trial and the
    first heartbeat leaves a running trial with none at all (Optuna's own reaper never fails
    that one). Past the grace both are failed, saying so, and queued again, wherever the
    machine's clock is set."""
    from qkvsearch.search.study.workers import RetryLost, beat, reap_lost

    cfg = compose_conf("sweep", [f"run_root={tmp_path}", f"storage={storage_name}"]).storage
    storage = open_storage(cfg)
    study = optuna.create_study(storage=storage, study_name="silent")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    beating = study.ask(x)
    study.ask(x)  # taken, never beats
    beat(storage, beating)
    retry = RetryLost(1)
    assert reap_lost(study, storage, grace_s=1, retry=retry) == []  # both are young
    time.sleep(1.5)
    assert reap_lost(study, storage, grace_s=1, retry=retry) == [0, 1]
    first, second, retried_first, retried_second = study.get_trials()
    assert re.fullmatch(r"worker lost: no heartbeat for \d+ s \(grace 1 s\); retried as trial 2",
                        first.user_attrs["fail_reason"])
    assert second.user_attrs["fail_reason"].startswith("worker lost: no heartbeat ever for")
    assert second.user_attrs["fail_reason"].endswith("retried as trial 3")
    assert (retried_first.state, retried_first.params, retried_first.user_attrs) == (State.WAITING, first.params, {RETRY_OF: 0})
    assert HEARTBEAT_ATTR not in retried_first.system_attrs
    again = study.ask(x)  # the retry, taken and lost too: max_retries=1 is used up
    assert again.number == 2
    time.sleep(1.5)
    reap_lost(study, storage, grace_s=1, retry=retry)
    assert study.get_trials()[2].user_attrs["fail_reason"].endswith("not retried: max_retries (1) reached")


def test_a_retry_records_its_constraints_afresh_and_draws_only_what_the_lost_trial_had_not(tmp_path, recwarn):
    from qkvsearch.search.study.workers import RetryLost

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lost = study.ask()
    width = lost.suggest_int("width", 1, 100)
    lost.set_constraint("max_params", -1.0)  # killed here: depth never sampled
    study.tell(lost, state=State.FAIL)
    RetryLost(2)(study, study.trials[0])
    retry = study.ask()
    assert retry.suggest_int("width", 1, 100) == width  # what it had sampled, it keeps
    assert 1 <= retry.suggest_int("depth", 1, 6) <= 6  # what it had not, is drawn now
    retry.set_constraint("max_params", -2.0)
    assert not [w for w in recwarn if "constraint value is ignored" in str(w.message)]
    study.tell(retry, 1.0)
    assert study.trials[1].system_attrs["constraints:max_params"] == -2.0


QKV = [sys.executable, "-m", "qkvsearch.search.cli"]
HOLD_AND_DIE = """
import os, signal, sys
from qkvsearch.search.base.configs import compose_config
from qkvsearch.search.study.storage import open_storage
storage = open_storage(compose_config("report", sys.argv[1:]).storage)
storage._backend._lock.acquire()  # a writer inside its write
os.kill(os.getpid(), signal.SIGKILL)  # killed there: the lock stays behind
"""


def test_a_killed_writers_journal_lock_is_freed_after_its_grace_and_sigterm_stops_a_wait(tmp_path):
    args = ["storage=journal", "run_root=runs", "storage.lock_grace_s=3"]
    assert subprocess.run([*QKV, "sweep", *SHORT, *args, "n_trials=1", "trainer.max_steps=10", *TEST_SWEEP],
                          cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    died = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, *args], cwd=tmp_path, capture_output=True, timeout=120)
    assert died.returncode == -signal.SIGKILL and (tmp_path / "runs" / "studies.journal.lock").is_symlink()
    # a report, run from the folder the relative path starts in, waits out the grace and succeeds
    began = time.monotonic()
    report = subprocess.run([*QKV, "report", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert time.monotonic() - began < 60
    # another stale lock, a long grace, and a SIGTERM while a command waits on it: it stops
    subprocess.run([sys.executable, "-c", HOLD_AND_DIE, *args], cwd=tmp_path, capture_output=True, timeout=120)
    waiting = subprocess.Popen([*QKV, "report", "storage=journal", "run_root=runs", "storage.lock_grace_s=600"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    assert waiting.poll() is None  # still waiting for the lock
    waiting.send_signal(signal.SIGTERM)
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in err


FULL_DISK = """
import resource, signal, subprocess, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk (ENOSPC)
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # no file of this process may pass 300 KB
sys.exit(subprocess.run(sys.argv[1:]).returncode)
"""


def test_a_trial_that_cannot_write_its_weights_fails_with_that_reason_and_the_study_goes_on(tmp_path):
    args = [*SHORT, "+space._target_=tests.search.helpers.heavy_space", "trainer.max_steps=20", "n_trials=2",
            "sampler=random", f"run_root={tmp_path}", *TEST_SWEEP]
    result = subprocess.run([sys.executable, "-c", FULL_DISK, *SWEEP_CMD, *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = optuna.load_study(study_name="recall-tiny", storage=f"sqlite:///{tmp_path}/studies.db").get_trials()
    assert [t.state for t in trials] == [State.FAIL, State.FAIL]  # both ran, neither lost the study
    for trial in trials:
        assert not list(tmp_path.glob(f"**/{trial.number:05d}/model.safetensors"))  # no partial file left behind
        assert re.match(r"OSError: cannot write weights to \S+/model\.safetensors: .*(File too large|No space)",
                        trial.user_attrs["fail_reason"]), trial.user_attrs["fail_reason"]
