"""`qkv sweep workers=N` and separately started processes on one study."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import optuna
import pytest
import yaml

from qkvsearch.search.study.storage import create_or_load_study, open_storage, slot_lock
from tests.conftest import CONF, SWEEP_CMD, TEST_SWEEP, compose_conf
from tests.search.faults import SHORT, State, qkv

pytestmark = pytest.mark.slow


def test_extra_workers_get_hydras_own_flags_too(tmp_path):
    """`--config-dir` and a config group that only exists there reach every worker."""
    mine = tmp_path / "myconf" / "space"
    mine.mkdir(parents=True)
    tiny = yaml.safe_load(open(f"{CONF}/space/tiny.yaml"))
    (mine / "mine.yaml").write_text(yaml.safe_dump({**tiny, "name": "mine"}))
    out = subprocess.run(
        [*SWEEP_CMD, "--config-dir", str(tmp_path / "myconf"), "space=mine", "workers=2",
         *SHORT, "trainer.max_steps=20",
         f"run_root={tmp_path}", "n_trials=2", "study_name=flags", *TEST_SWEEP],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="flags", storage=f"sqlite:///{tmp_path}/studies.db")
    assert study.user_attrs["workers_joined"] == 2, "the extra worker never joined the study"
    assert "Could not find" not in (tmp_path / "workers" / "flags" / "worker-1.log").read_text()


def test_a_worker_that_dies_at_start_up_fails_the_sweep_loudly(tmp_path):
    out = subprocess.run(
        [*SWEEP_CMD, *SHORT, "+space._target_=tests.search.helpers.dies_in_extra_workers",
         "workers=2", f"run_root={tmp_path}", "n_trials=2", "study_name=dies", "trainer.max_steps=30", *TEST_SWEEP],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1
    assert "exited with status 1" in out.stderr and "this extra worker fails on purpose" in out.stderr
    assert "1 of 2 workers failed" in out.stderr


def test_an_architecture_running_on_one_worker_is_not_trained_again_by_another(tmp_path):
    args = [*SHORT, "+space._target_=tests.search.helpers.fixed_space", f"run_root={tmp_path}", "n_trials=2",
            "study_name=once", "trainer.max_steps=800", "trainer.val_check_interval=400"]
    procs = [qkv(*args, log=tmp_path / f"p{i}.log") for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, (tmp_path / "p0.log").read_text()[-2000:]
    first, second = optuna.load_study(study_name="once", storage=f"sqlite:///{tmp_path}/studies.db").get_trials()
    assert first.state == second.state == State.COMPLETE
    assert second.user_attrs["duplicate_of"] == 0 and second.values == first.values
    assert second.user_attrs.get("waited_for") == 0, "the second process should have found the first one training"
    assert second.user_attrs["worker"] != first.user_attrs["worker"]


@pytest.mark.postgres
def test_concurrent_first_starts_on_a_fresh_postgres_never_crash(postgres_url):
    import sqlalchemy

    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    script = (
        "import sys; from omegaconf import OmegaConf; import optuna\n"
        "from qkvsearch.search.study.storage import open_storage, slot_lock, create_or_load_study\n"
        "cfg = OmegaConf.create({'kind': 'rdb', 'url': sys.argv[1], 'heartbeat_s': 30, 'grace_s': 120})\n"
        "storage = open_storage(cfg)\n"
        "with slot_lock(cfg, 'race'):\n"
        "    create_or_load_study(storage, 'race', ['minimize'], optuna.samplers.RandomSampler(), optuna.pruners.NopPruner())\n"
    )
    failures = []
    for round_ in range(3):  # 12 first starts in all (kept short for CI's 2 cores)
        name = f"race{round_}"
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
        procs = [subprocess.Popen([sys.executable, "-c", script, url], stderr=subprocess.PIPE, text=True) for _ in range(4)]
        failures += [p.communicate(timeout=120)[1][-1500:] for p in procs if p.wait(timeout=120) != 0]
    admin.dispose()
    assert failures == []


def test_the_slot_lock_makes_one_process_create_the_study(tmp_path):
    cfg = compose_conf("sweep", [f"run_root={tmp_path}"]).storage
    storage = open_storage(cfg)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with slot_lock(cfg, "one"):
                create_or_load_study(storage, "one", ["minimize"], optuna.samplers.RandomSampler(), optuna.pruners.NopPruner())
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["one"]


def test_a_project_with_its_own_models_and_conf_packages_runs_every_worker(tmp_path):
    """The installed package is qkvsearch.*: a user's own models/ or conf/ never shadows it."""
    project = tmp_path / "project"
    for name in ("models", "conf", "search", "tasks", "spaces"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the project\\'s own {name} was imported')\n")
    (project / "conf" / "sweep.yaml").write_text("n_trials: 1000\n")
    out = subprocess.run(
        [*SWEEP_CMD, *SHORT, "trainer.max_steps=20", "workers=2",
         f"run_root={tmp_path}/runs", "n_trials=2", "study_name=own", *TEST_SWEEP],
        capture_output=True, text=True, timeout=300, cwd=project, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="own", storage=f"sqlite:///{tmp_path}/runs/studies.db")
    assert len(study.get_trials()) == 2
    assert study.user_attrs["workers_joined"] == 2, "the extra worker never joined the study"
    assert "ImportError" not in (tmp_path / "runs" / "workers" / "own" / "worker-1.log").read_text()
