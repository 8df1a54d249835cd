"""Each worker of a sweep trains on its own device."""

from __future__ import annotations

import os
import subprocess

import optuna
import pytest

from qkvsearch.models.errors import QkvError
from qkvsearch.search.study.devices import plan_workers
from tests.conftest import SWEEP_CMD, TEST_SWEEP, compose_conf
from tests.search.faults import SHORT


def _plan(*overrides: str):
    return plan_workers(compose_conf("sweep", list(overrides)))


def test_auto_on_a_cpu_is_one_worker_per_two_cores():
    plan = _plan("workers=auto", "trainer=cpu")
    assert plan.workers == max(1, (os.cpu_count() or 1) // 2) and set(plan.devices) == {None}


def test_auto_on_gpus_is_one_worker_per_visible_gpu_or_k_per_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert _plan("workers=auto", "trainer=gpu").devices == ["2", "3"]
    assert _plan("workers=auto", "trainer=gpu", "trials_per_gpu=2").devices == ["2", "2", "3", "3"]
    assert _plan("workers=1", "trainer=gpu").devices == ["2"]
    assert _plan("workers=auto", "trainer=gpu", "gpus=[0]").devices == ["0"]  # gpus chooses among them


def test_a_worker_of_multi_gpu_trials_owns_that_many_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4")
    assert _plan("workers=auto", "trainer=gpu", "trainer.devices=2").devices == ["0,1", "2,3"]
    assert _plan("workers=1", "trainer=gpu", "trainer.devices=4", "gpus=[4,3,2,1]").devices == ["4,3,2,1"]
    assert _plan("workers=auto", "trainer=cpu", "trainer.devices=2").workers == max(1, (os.cpu_count() or 1) // 4)


@pytest.mark.parametrize(("overrides", "message"), [
    (["workers=3", "gpus=[0,1,2,3]", "trainer.devices=2"], r"workers=3 with trainer.devices=2 needs 6 GPUs; gpus=\['0', '1', '2', '3'\] has 4"),
    (["workers=auto", "gpus=[0]", "trainer.devices=2"], r"workers=auto with trainer.devices=2 needs 2 GPUs; gpus=\['0'\] has 1"),
    (["gpus=[0,1]", "trainer.devices=2", "trials_per_gpu=2"], r"trials_per_gpu=2 packs single-GPU trials; with trainer.devices=2 keep it 1"),
    (["workers=3", "gpus=[0,1]"], r"workers=3 needs 3 GPU slots; gpus=\['0', '1'\] x trials_per_gpu=1 gives 2"),
    (["trials_per_gpu=0", "gpus=[0]"], r"trials_per_gpu must be an integer >= 1, got 0"),
    (["gpus=[1,1]"], r"gpus must be null \(every visible GPU\) or a list of distinct GPU indices, got \[1, 1\]"),
    (["workers=many"], r"workers must be an integer >= 1 or 'auto', got 'many'"),
])
def test_bad_device_settings_name_the_field(overrides, message):
    with pytest.raises(QkvError, match=message):
        _plan(*overrides)


@pytest.mark.slow
def test_each_worker_sees_only_its_own_gpu_and_its_trials_say_which(tmp_path):
    out = subprocess.run(
        [*SWEEP_CMD, *SHORT, "trainer.max_steps=150", "workers=2",
         "gpus=[5,7]", "trainer.accelerator=cpu", f"run_root={tmp_path}", "n_trials=4", "study_name=pinned", *TEST_SWEEP],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="pinned", storage=f"sqlite:///{tmp_path}/studies.db")
    assert study.user_attrs["workers_joined"] == 2
    device_of: dict[int, set[str]] = {}
    for trial in study.trials:
        device_of.setdefault(trial.user_attrs["worker_index"], set()).add(trial.user_attrs["cuda_visible_devices"])
    assert all(len(devices) == 1 for devices in device_of.values()), device_of  # a worker keeps its one GPU
    assert set().union(*device_of.values()) == {"5", "7"}, device_of  # and the two workers have different ones


def test_a_trial_records_its_device_speed_and_model_flop_utilisation(tmp_path):
    from qkvsearch.search.study.sweep import sweep
    from tests.conftest import tiny_sweep_conf

    study = sweep(tiny_sweep_conf(tmp_path, "n_trials=1", "pruner=none", "peak_tflops=0.5"))
    attrs = study.trials[0].user_attrs
    assert attrs["device"] == "cpu" and attrs["device_name"]
    assert attrs["train_tokens"] > 0 and attrs["train_tokens"] % 30 == 0  # 30 steps of equal batches (tiny_sweep_conf)
    assert attrs["train_tokens_per_s"] > 0
    expected = 3 * attrs["flops_per_token"] * attrs["train_tokens_per_s"] / 0.5e12
    assert attrs["mfu"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert "peak_memory_mb" not in attrs  # a CUDA figure


def test_a_compiler_that_fails_leaves_the_trial_eager_with_the_reason(tmp_path):
    from qkvsearch.search.study.sweep import sweep
    from tests.conftest import tiny_sweep_conf

    study = sweep(tiny_sweep_conf(tmp_path, "n_trials=1", "pruner=none", "compile=true", "compile_backend=no_such_backend"))
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["compiled"] is False
    assert "no_such_backend" in trial.user_attrs["compile_fallback"]
