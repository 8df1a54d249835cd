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
    (["trials_per_gpu=0", "gpus=[0]"], r"trials_per_gpu must be an integer >= 1 or 'auto', got 0"),
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


def test_cuda_graph_capture_off_cuda_compiles_in_the_default_mode_and_says_so(tmp_path):
    from qkvsearch.search.study.sweep import sweep
    from tests.conftest import tiny_sweep_conf

    study = sweep(tiny_sweep_conf(tmp_path, "n_trials=1", "pruner=none", "compile=true", "compile_backend=eager",
                                  "compile_mode=reduce-overhead"))
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["compiled"] is True
    assert trial.user_attrs["compile_fallback"] == "compile_mode=reduce-overhead captures CUDA graphs; on cpu the default mode ran"


def test_an_unknown_compile_mode_is_refused_naming_the_valid_ones(tmp_path):
    from qkvsearch.search.base.settings import check_sweep

    with pytest.raises(QkvError, match=r"compile_mode must be one of none, default, reduce-overhead, .*; got 'fast'"):
        check_sweep(compose_conf("sweep", ["compile_mode=fast"]))


def _fake_gpus(tmp_path, monkeypatch, free_mib: list[int]):
    """A node of len(free_mib) GPUs as nvidia-smi reports them (this machine has none)."""
    (tmp_path / "query.txt").write_text("".join(f"{i}, GPU-{i:04d}, {mib}\n" for i, mib in enumerate(free_mib)))
    (tmp_path / "list.txt").write_text("".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i:04d})\n" for i in range(len(free_mib))))
    script = tmp_path / "nvidia-smi"
    script.write_text(f'#!/bin/sh\nif [ "$1" = -L ]; then cat {tmp_path}/list.txt; else cat {tmp_path}/query.txt; fi\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_auto_packs_as_many_trials_per_gpu_as_the_emptiest_gpu_holds(tmp_path, monkeypatch):
    from qkvsearch.search.study.devices import MAX_TRIALS_PER_GPU, USABLE, WORKER_OVERHEAD, GiB

    _fake_gpus(tmp_path, monkeypatch, [80_000] * 7 + [20_000])  # an 8-GPU node, one GPU mostly taken
    cfg = compose_conf("sweep", ["workers=auto", "trainer=gpu", "trials_per_gpu=auto"])
    largest = int(1.5 * GiB)
    plan = plan_workers(cfg, largest=lambda: largest)
    per_gpu = plan.workers // 8
    assert plan.devices == [str(g) for g in range(8) for _ in range(per_gpu)]
    # the emptiest GPU holds them all, with a worker's overhead each, and not one more
    assert per_gpu * (largest + WORKER_OVERHEAD) <= USABLE * 20_000 * 2**20 < (per_gpu + 1) * (largest + WORKER_OVERHEAD)
    assert per_gpu == 7
    # small trials: capped, the GPU's time being what they then share
    assert plan_workers(cfg, largest=lambda: 2**20).workers == 8 * MAX_TRIALS_PER_GPU
    # a trial larger than a GPU: one worker each; its trials' own preflight prunes with the reason
    assert plan_workers(cfg, largest=lambda: 200 * GiB).workers == 8


def test_auto_counts_the_spaces_largest_trial_itself(tmp_path, monkeypatch):
    from qkvsearch.search.study.devices import largest_trial_memory, trials_that_fit

    _fake_gpus(tmp_path, monkeypatch, [16_000, 16_000])
    cfg = compose_conf("sweep", ["workers=auto", "trainer=gpu", "trials_per_gpu=auto", "space=decoder", "task=recall"])
    need = largest_trial_memory(cfg)
    assert need is not None and need > 0
    plan = plan_workers(cfg)
    assert plan.workers == 2 * max(1, trials_that_fit(need, 16_000 * 2**20))


def test_a_trials_per_gpu_the_gpus_cannot_hold_is_refused_before_anything_starts(tmp_path, monkeypatch):
    from qkvsearch.search.study.devices import GiB

    _fake_gpus(tmp_path, monkeypatch, [40_000, 10_000])
    cfg = compose_conf("sweep", ["workers=auto", "trainer=gpu", "trials_per_gpu=8"])
    with pytest.raises(QkvError, match=r"trials_per_gpu=8 does not fit: the space's largest trial needs ~2.00 GiB .* "
                                       r"GPU 1 has 9.8 GiB free .*: at most 2 per GPU"):
        plan_workers(cfg, largest=lambda: 2 * GiB)
    cfg.trials_per_gpu = 2
    assert plan_workers(cfg, largest=lambda: 2 * GiB).devices == ["0", "0", "1", "1"]
