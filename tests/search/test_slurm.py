"""Sweeps on a real (throwaway, one-node) SLURM cluster through Hydra's submitit launcher."""

from __future__ import annotations

import os
import pathlib
import subprocess
import time

import optuna
import pytest

from qkvsearch.search.base.keys import RETRY_OF
from qkvsearch.search.inspect.selection import counted
from tests.conftest import SWEEP_CMD, TEST_SWEEP
from tests.search.faults import SHORT
from tests.search.slurm import cluster_state

State = optuna.trial.TrialState
pytestmark = [pytest.mark.slow, pytest.mark.slurm]
#: the slurm_gpu preset, cut down to this machine: no GPU, one core and 2 GB per job
SMALL_JOBS = ["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
              "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]


@pytest.fixture
def submit(slurm_env):
    """Starts ``qkv sweep -m`` on the cluster; a launcher a failed test leaves is killed."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        env = {**os.environ, **slurm_env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        started.append(subprocess.Popen([*SWEEP_CMD, "-m", *SMALL_JOBS, *args, *TEST_SWEEP],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env={**os.environ, **slurm_env})


def squeue(slurm_env: dict[str, str]) -> list[list[str]]:
    """The queue's jobs: id, state, CPUs, minimum memory, time limit."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %C %m %l"], capture_output=True, text=True,
                         env={**os.environ, **slurm_env}).stdout
    return [line.split() for line in out.splitlines()]


def storage_args(kind: str, tmp_path: pathlib.Path, postgres_url: str | None) -> tuple[list[str], str]:
    if kind == "postgres":
        return ["storage=postgres", f"storage.url={postgres_url}"], postgres_url
    path = tmp_path / "journal.log"  # the test's filesystem stands in for a shared one
    return ["storage=journal", f"storage.path={path}"], str(path)


def load(storage: str, name: str) -> optuna.Study:
    if storage.startswith("postgresql"):
        return optuna.load_study(study_name=name, storage=storage)
    backend = optuna.storages.journal.JournalFileBackend(storage)
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def trial_mid_training(proc: subprocess.Popen, storage: str, name: str) -> optuna.trial.FrozenTrial:
    """The first running trial of a SLURM job that has reported a validation."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            running = load(storage, name).get_trials(states=(State.RUNNING,))
        except KeyError:
            running = []
        started = [t for t in running if t.intermediate_values and "slurm_job_id" in t.user_attrs]
        if started:
            return started[0]
        time.sleep(0.3)
    raise AssertionError("no trial started")


def test_workers_on_slurm_are_one_job_array_working_on_one_study_to_exactly_n_trials(tmp_path, slurm_env, submit, postgres_url):
    # (the journal storage on a shared filesystem: the requeue test below)
    extra, storage = storage_args("postgres", tmp_path, postgres_url)
    name = f"slurm-array-{tmp_path.name[-6:]}"
    proc = submit(*SHORT, *extra, f"run_root={tmp_path}", "n_trials=4", f"study_name={name}", "workers=4")
    seen: set[tuple[str, ...]] = set()
    while proc.poll() is None:
        seen |= {tuple(job) for job in squeue(slurm_env)}
        time.sleep(0.3)
    out = proc.stdout.read().decode()
    assert proc.returncode == 0, out[-3000:]
    assert "one job array of 4 tasks, one worker each" in out
    # one array (one id before the underscore) of 4 tasks; a pending range shows as 12_[2-3]
    arrays = {job[0].split("_")[0] for job in seen}
    assert len(arrays) == 1, seen
    (array,) = arrays
    tasks = {int(i) for job in seen for i in _task_ids(job[0])}
    assert tasks == {0, 1, 2, 3}, seen
    assert all(job[2:] == ("1", "2G", "10:00") for job in seen if job[1] == "RUNNING")  # the resources asked for
    trials = load(storage, name).get_trials()
    assert len(counted(trials)) == 4 and all(t.state == State.COMPLETE for t in trials)
    jobs = {t.user_attrs["slurm_job_id"] for t in trials}
    assert all(job.split("_")[0] == array for job in jobs), jobs  # each trial names its array task
    assert f"each job's log: {tmp_path}/slurm/<job id>/<job id>_0_log.out" in out
    for job in jobs:  # each task's log lands under run_root/slurm/<job id>/
        assert (tmp_path / "slurm" / job / f"{job}_0_log.out").exists(), sorted(p.name for p in (tmp_path / "slurm").iterdir())


def _task_ids(job_id: str) -> list[int]:
    """The array task ids ``squeue`` names in ``12_3`` or ``12_[1-3,5%256]``."""
    tail = job_id.split("_", 1)[1].strip("[]").split("%")[0]
    ids: list[int] = []
    for part in tail.split(","):
        low, _, high = part.partition("-")
        ids += range(int(low), int(high or low) + 1)
    return ids


def test_a_cancelled_job_has_its_trial_retried_and_the_study_still_ends_at_n_trials(tmp_path, slurm_env, submit, postgres_url):
    name = f"slurm-cancel-{tmp_path.name[-6:]}"
    proc = submit(*SHORT, "storage=postgres", f"storage.url={postgres_url}", f"run_root={tmp_path}",
                  "n_trials=3", f"study_name={name}", "worker_index=0,1", "trainer.max_steps=200",
                  "trainer.val_check_interval=20")
    cancelled = trial_mid_training(proc, postgres_url, name)
    subprocess.run(["scancel", cancelled.user_attrs["slurm_job_id"]], check=True, env={**os.environ, **slurm_env})
    # submitit's launcher learns of a cancelled job from sacct, which needs SLURM's accounting
    # database (a real cluster has one; this one does not): once the queue is empty, the
    # launching process has nothing left to wait for and is stopped here
    deadline = time.time() + 300
    while squeue(slurm_env) and time.time() < deadline:
        time.sleep(0.5)
    assert not squeue(slurm_env)
    proc.terminate()
    proc.wait(timeout=30)
    trials = load(postgres_url, name).get_trials()
    first = next(t for t in trials if t.number == cancelled.number)
    assert first.state == State.FAIL and "interrupted (SIGTERM)" in first.user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get(RETRY_OF) == first.number]
    assert retry and retry[0].state == State.COMPLETE  # the other job trained it
    assert len(counted(trials)) == 3 and all(t.state.is_finished() for t in trials)


def test_a_job_signalled_before_its_time_limit_records_its_trial_and_is_requeued_to_work_again(tmp_path, slurm_env, submit):
    # SLURM sends submitit's SIGUSR2 ahead of a job's time limit (or on pre-emption): the
    # sweep records its running trial as interrupted, then submitit requeues the job, and the
    # same job, run again, joins the study and trains the retry
    storage_extra, storage = storage_args("journal", tmp_path, None)
    name = f"slurm-requeue-{tmp_path.name[-6:]}"
    proc = submit(*SHORT, *storage_extra, f"run_root={tmp_path}", "n_trials=2", f"study_name={name}",
                  "worker_index=0", "trainer.max_steps=300", "trainer.val_check_interval=20")
    signalled = trial_mid_training(proc, storage, name)
    subprocess.run(["scancel", "--signal=USR2", signalled.user_attrs["slurm_job_id"]], check=True,
                   env={**os.environ, **slurm_env})
    # slurmctld holds the requeued job for the cluster's credential lifetime (CRED_EXPIRE_S)
    # and then starts it by itself; starting it sooner by hand can race the revocation of the
    # killed run's credential, and the job then never runs again (seen under load)
    try:
        out, _ = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        logs = "".join(path.read_text()[-2000:] for path in sorted((tmp_path / "slurm").glob("*/*_log.*")))
        pytest.fail(f"the requeued job did not finish\n{cluster_state(slurm_env)}\njob logs:\n{logs}")
    assert proc.returncode == 0, out.decode()[-3000:]  # the launcher got the requeued job's result
    trials = load(storage, name).get_trials()
    first = next(t for t in trials if t.number == signalled.number)
    assert first.state == State.FAIL and "interrupted (SIGUSR2)" in first.user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get(RETRY_OF) == first.number]
    assert retry and retry[0].state == State.COMPLETE
    assert retry[0].user_attrs["slurm_job_id"] == first.user_attrs["slurm_job_id"]  # the same job, requeued
    assert retry[0].user_attrs["worker"] != first.user_attrs["worker"]  # in a new process
    assert len(counted(trials)) == 2
