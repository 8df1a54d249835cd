"""The user's own modules, named once with plugins=[...]: no PYTHONPATH, no silent narrowing."""

from __future__ import annotations

import os
import pathlib
import subprocess

import optuna
import pytest

import qkvsearch.conf
from qkvsearch.search.base.keys import ARCH_HASH
from qkvsearch.search.base.records import ARCH_PREFIX
from tests.conftest import SWEEP_CMD, TEST_SWEEP
from tests.search.faults import SHORT

HALVED = '''
import dataclasses

from qkvsearch.models.scaling import SCALINGS, Scaling, ScalingConfig


@dataclasses.dataclass(frozen=True)
class HalvedConfig(ScalingConfig):
    """Half the usual 1 / sqrt(d_k)."""

    def source(self, n_heads, d_k):
        return f"Scaling({0.5 / d_k ** 0.5!r})"


@SCALINGS.register("halved", HalvedConfig)
def _halved(config, *, n_heads, d_k):
    return Scaling(0.5 / d_k ** 0.5)
'''
MY_DATA = '''
from qkvsearch.tasks import AssociativeRecall


class MyRecall(AssociativeRecall):
    name = "myrecall"
'''


def project(tmp_path: pathlib.Path) -> pathlib.Path:
    """A user's folder: a component module, a data module and a space that uses both."""
    (tmp_path / "mycomp.py").write_text(HALVED)
    (tmp_path / "mydata.py").write_text(MY_DATA)
    tiny = pathlib.Path(qkvsearch.conf.__path__[0], "space", "tiny.yaml").read_text()
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "mine.yaml").write_text(
        tiny.replace("choices: [sqrt_dk, qk_norm]", "choices: [sqrt_dk, halved]").replace("name: tiny", "name: mine"))
    return tmp_path


def qkv_sweep(cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([*SWEEP_CMD, "--config-dir", str(cwd), "space=mine",
                           *SHORT, "run_root=runs", *args, *TEST_SWEEP], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})


def test_a_space_naming_an_unregistered_component_is_a_config_error_before_any_trial(tmp_path):
    result = qkv_sweep(project(tmp_path), "n_trials=2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "a choice names a component that is not registered" in result.stderr
    assert "unknown scaling 'halved'; available: sqrt_dk" in result.stderr and "plugins=[...]" in result.stderr
    db = tmp_path / "runs" / "studies.db"
    assert not db.exists() or not any(s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{db}"))


@pytest.mark.slow
def test_plugins_register_components_and_data_modules_of_ones_own_folder(tmp_path):
    result = qkv_sweep(project(tmp_path), "plugins=[mycomp,mydata]", "task.data._target_=mydata.MyRecall", "n_trials=4",
                       "study_name=mine")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path}/runs/studies.db")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    stored = study._storage.get_study_system_attrs(study._study_id)  # raw: 'halved' is registered in the sweep only
    scalings = {stored[ARCH_PREFIX + str(t.user_attrs[ARCH_HASH])]["decoder"]["attention"]["scaling"]["name"]
                for t in study.trials}
    assert "halved" in scalings


def test_a_plugin_that_does_not_import_is_named(tmp_path):
    result = qkv_sweep(project(tmp_path), "plugins=[missing_module]")
    assert result.returncode == 2
    assert "plugins: cannot import 'missing_module' (No module named 'missing_module')" in result.stderr
