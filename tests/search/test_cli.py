"""The qkv command behaves as a Hydra app should."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import yaml

from qkvsearch.search.cli import COMMANDS
from tests.conftest import TEST_SWEEP


def _qkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkvsearch.search.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_once_with_its_summary():
    result = _qkv("--help")
    assert result.returncode == 0
    listed = result.stdout.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in listed}
    assert len(listed) == len(COMMANDS) and rows == {name: summary for name, (_, summary) in COMMANDS.items()}


def test_an_unknown_command_is_refused_with_the_list():
    result = _qkv("swep")
    assert result.returncode == 2
    assert "unknown command 'swep' (did you mean 'sweep'?); available: sweep, train" in result.stderr


def test_cfg_job_prints_the_composed_config_with_overrides():
    result = _qkv("sweep", "--cfg", "job", "space=decoder", "n_trials=30", "sampler=random")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["n_trials"] == 30 and cfg["space"]["name"] == "decoder"
    assert cfg["sampler"]["_target_"] == "optuna.samplers.RandomSampler"


@pytest.mark.slow
def test_multirun_runs_one_sweep_per_value(tmp_path):
    result = _qkv("sweep", "-m", *TEST_SWEEP, "task=recall", "task.data.n_train=256", "task.data.n_val=64", "trainer.max_steps=10",
                  "trainer.val_check_interval=5", "trainer.limit_val_batches=1", "n_trials=1", f"run_root={tmp_path}",
                  "space=tiny", "seed=0,1", "study_name=multi${seed}")
    assert result.returncode == 0, result.stderr[-2000:]
    import optuna

    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/studies.db")}
    assert names == {"multi0", "multi1"}


@pytest.mark.slow
def test_a_multirun_makes_one_study_per_job_by_default(tmp_path):
    result = _qkv("sweep", "-m", *TEST_SWEEP, "task=recall", "task.data.n_train=256", "task.data.n_val=64", "trainer.max_steps=10",
                  "trainer.val_check_interval=5", "trainer.limit_val_batches=1", "n_trials=1", f"run_root={tmp_path}",
                  "seed=0,1")
    assert result.returncode == 0, result.stderr[-2000:]
    import optuna

    storage = f"sqlite:///{tmp_path}/studies.db"
    summaries = optuna.get_all_study_summaries(storage)
    assert len(summaries) == 2 and all(s.n_trials == 1 for s in summaries)
    assert all(re.fullmatch(r"recall-tiny-[0-9a-f]{8}", s.study_name) for s in summaries)  # short, safe names
    seeds = sorted(o for s in summaries for o in optuna.load_study(study_name=s.study_name, storage=storage)
                   .user_attrs["overrides"] if o.startswith("seed="))
    assert seeds == ["seed=0", "seed=1"]  # the overrides kept with each study
    printed = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if line.startswith("report:")]
    assert len(printed) == 2
    assert len(set(printed)) == 2
    # a follow-up command pastes as printed (one: each is a whole report, the other only differs in its name)
    report = subprocess.run([sys.executable, "-m", "qkvsearch.search.cli", *shlex.split(printed[1])[1:]],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]


def test_bad_input_ends_with_its_message_and_status_2_not_a_traceback(tmp_path):
    result = _qkv("sweep", "n_trials=0", f"run_root={tmp_path}")
    assert result.returncode == 2
    assert "qkv: error: n_trials must be an integer >= 1, got 0" in result.stderr and "Traceback" not in result.stderr
    result = _qkv("export", f"run_root={tmp_path}")
    assert result.returncode == 2 and "no storage at" in result.stderr and "run `qkv sweep` first" in result.stderr


def test_command_help_is_read_from_the_yaml_without_importing_torch():
    code = ("import sys; sys.argv = ['qkv', 'sweep', '--help']\n"
            "from qkvsearch.search.cli import main; main()\n"
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'help imported the heavy stack'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "task       " in result.stdout and "lm_stdlib | digits | recall | reverse" in result.stdout
    assert "n_trials" in result.stdout and "finished trials" in result.stdout
    assert "per_layer" not in result.stdout and "distribution" not in result.stdout  # no space body
    export = _qkv("export", "--help").stdout
    assert "storage" in export and "space " not in export and "sampler" not in export  # only its own groups


@pytest.mark.parametrize(("args", "message"), [
    (["sweeep"], "unknown command 'sweeep' (did you mean 'sweep'?)"),
    (["sweep", "n_trails=5"], "unknown setting 'n_trails' (did you mean 'n_trials'?)"),
    (["sweep", "task=recal"], "task=recal: no option 'recal' (did you mean 'recall'?)"),
    (["export", "rul=best"], "unknown setting 'rul' (did you mean 'rule'?)"),
])
def test_a_mistyped_name_is_refused_with_the_close_one(args, message):
    result = _qkv(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ["sweep", "study_name=../x"], ["train"], ["export", "study_name=nope"], ["report", "study_name=nope"],
    ["dashboard"], ["space", "show", "space=nope"],
])
def test_no_command_leaves_files_behind_on_bad_input(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "qkvsearch.search.cli", *args], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "qkv" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_postgres_is_a_clean_error_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qkvsearch.search.cli", "report", "storage=postgres",
                             "storage.url=postgresql+psycopg2://nobody@127.0.0.1:9/none"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "qkv: error: cannot open storage" in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_make_idle_openmp_threads_sleep_unless_the_user_chose():
    code = ("import os, sys; sys.argv = ['qkv', 'sweep', '--cfg', 'job']\n"
            "from qkvsearch.search.cli import main; main()\n"
            "print('policy', os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0 and "policy PASSIVE" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert "policy ACTIVE" in result.stdout


def test_threads_per_worker_is_a_setting():
    from qkvsearch.search.base.settings import check_sweep, threads_per_worker
    from tests.conftest import compose_conf

    assert threads_per_worker(compose_conf("sweep", ["threads=3"])) == 3
    assert threads_per_worker(compose_conf("sweep", ["threads=null", "workers=2"])) == max(1, (__import__("os").cpu_count() or 1) // 2)
    with pytest.raises(ValueError, match=r"threads must be null \(share the cores\) or an integer >= 1, got 0"):
        check_sweep(compose_conf("sweep", ["threads=0"]))


@pytest.mark.parametrize(("line", "message"), [
    ("max_params: !!python/name:os.system 5", r"mine\.yaml, line \d+, column \d+: could not determine a constructor "
                                              r".*tags are not allowed in config files"),
    ("max_params: {200000", r"mine\.yaml, line \d+, column \d+: .*expected ',' or '\}'"),
])
def test_a_broken_space_file_is_one_line_naming_the_file_and_place(tmp_path, line, message):
    import re
    from pathlib import Path

    import qkvsearch.conf

    tiny = Path(qkvsearch.conf.__path__[0], "space", "tiny.yaml").read_text()
    assert "  max_params: 200000\n" in tiny
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "mine.yaml").write_text(tiny.replace("max_params: 200000", line).replace("name: tiny", "name: mine"))
    result = _qkv("space", "show", "--config-dir", str(tmp_path), "space=mine")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(r"qkv space: error: .*" + message, result.stderr), result.stderr


def test_an_override_that_does_not_parse_is_a_clean_error():
    result = _qkv("sweep", "n_trials=[")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "qkv sweep: error: no viable alternative at input '['" in result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["hydra/launcher=slurm_gpu", "workers=64", "storage=postgres"],
     ["-m", "hydra/launcher=slurm_gpu", "workers=1", "worker_index=range(0,64)", "storage=postgres"]),
    (["hydra/launcher=slurm_gpu", "workers=64", "--cfg", "job"],  # Hydra shows one job: the first task's
     ["hydra/launcher=slurm_gpu", "workers=1", "worker_index=0", "--cfg", "job"]),
    (["-m", "workers=3", "hydra/launcher=submitit_slurm"],
     ["-m", "workers=1", "worker_index=range(0,3)", "hydra/launcher=submitit_slurm"]),
    # left alone: the node preset (workers counts a node's), worker_index given, one worker, auto, no SLURM
    (["-m", "hydra/launcher=slurm_node", "workers=8", "worker_index=0,1"], None),
    (["-m", "hydra/launcher=slurm_gpu", "workers=2", "worker_index=0,1"], None),
    (["hydra/launcher=slurm_gpu", "workers=1"], None),
    (["hydra/launcher=slurm_gpu", "workers=auto"], None),
    (["workers=4"], None),
])
def test_workers_on_a_one_worker_per_job_slurm_launcher_become_one_job_array(args, expected):
    from qkvsearch.search.cli_conf import slurm_array

    rewritten, note = slurm_array(args)
    assert rewritten == (args if expected is None else expected)
    assert (note is None) == (expected is None)


def test_a_slurm_array_sweep_composes_one_job_per_task():
    # Hydra itself reads the rewritten multirun: worker_index=range(0,4) sweeps four jobs
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from qkvsearch.search.cli_conf import slurm_array

    rewritten, _ = slurm_array(["hydra/launcher=slurm_gpu", "workers=4"])
    (sweep,) = [o for o in OverridesParser.create().parse_overrides([a for a in rewritten if a != "-m"]) if o.is_sweep_override()]
    assert sweep.key_or_group == "worker_index" and list(sweep.sweep_iterator()) == [0, 1, 2, 3]
