"""Checks that need a CUDA device; skipped without one (CI has none)."""

from __future__ import annotations

import pytest
import torch

from qkvsearch.models import ArchConfig, build_model, set_attention_path
from tests.models.helpers import all_combinations, attention_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("scaling", "masks", "positions"), all_combinations()[::7])
def test_fused_and_reference_paths_agree_on_cuda(scaling, masks, positions):
    model = build_model(attention_config(masks=masks, scaling=scaling, positions=positions)).cuda().eval()
    tokens = torch.randint(0, 11, (2, 16), device="cuda")
    padding_mask = torch.arange(16, device="cuda")[None, :] < torch.tensor([[16], [9]], device="cuda")
    fused = model(tokens, padding_mask)
    set_attention_path(model, "reference")
    torch.testing.assert_close(fused, model(tokens, padding_mask), rtol=1e-4, atol=1e-4)


def test_a_gpu_trial_trains_and_validates_in_bf16(tmp_path):
    from qkvsearch.search.base.settings import LoopSettings
    from qkvsearch.search.trial.lit import LitTransformer
    from qkvsearch.search.trial.loop import fit
    from tests.search.test_loop import ARCH, _task

    task = _task(tmp_path)
    lit = LitTransformer(ArchConfig.from_dict(ARCH), task.kind, max_steps=4)
    dtypes = set()
    projection = next(m for m in lit.model.modules() if isinstance(m, torch.nn.Linear))
    projection.register_forward_hook(lambda module, args, out: dtypes.add((module.training, out.dtype)))
    result = fit(lit, task, LoopSettings(max_steps=4, val_check_interval=2, limit_val_batches=1, accelerator="gpu",
                                         devices=1, precision="bf16-mixed"), [])
    assert result.device.startswith("cuda")
    assert dtypes == {(True, torch.bfloat16), (False, torch.bfloat16)}


@pytest.mark.slow
def test_a_sweep_trains_its_trials_on_the_gpu(tmp_path):
    import optuna

    from qkvsearch.search.study.sweep import sweep
    from tests.conftest import tiny_sweep_conf

    cfg = tiny_sweep_conf(tmp_path, "trainer=gpu", "trainer.max_steps=30", "trainer.val_check_interval=10",
                          "trainer.limit_val_batches=2", "n_trials=2", "pruner=none")
    sweep(cfg)
    trials = optuna.load_study(study_name=cfg.study_name, storage=str(cfg.storage.url)).get_trials()
    assert all(t.user_attrs["device"].startswith("cuda") for t in trials)


@pytest.mark.slow
def test_a_gpu_sweep_uses_bf16_compiles_and_records_its_speed(tmp_path):
    from qkvsearch.search.study.sweep import sweep
    from tests.conftest import tiny_sweep_conf

    study = sweep(tiny_sweep_conf(tmp_path, "trainer=gpu", "trainer.max_steps=30", "trainer.val_check_interval=10",
                                  "trainer.limit_val_batches=2", "n_trials=1", "pruner=none", "compile=true"))
    attrs = study.trials[0].user_attrs
    assert attrs["device"].startswith("cuda") and attrs["peak_memory_mb"] > 0
    assert attrs["compiled"] is True, attrs.get("compile_fallback")
    assert attrs["train_tokens_per_s"] > 0
    if any(name in attrs["device_name"] for name in ("H100", "H200", "A100")):
        assert 0 < attrs["mfu"] < 1


@pytest.mark.slow
def test_workers_auto_starts_one_worker_per_gpu(tmp_path):
    import os
    import subprocess

    import optuna

    from tests.conftest import SWEEP_CMD, TEST_SWEEP
    from tests.search.faults import SHORT

    out = subprocess.run([*SWEEP_CMD, *SHORT, "trainer=gpu",
                          "trainer.max_steps=20", "trainer.val_check_interval=10", "workers=auto",
                          f"run_root={tmp_path}", f"n_trials={2 * torch.cuda.device_count()}", "study_name=per_gpu", *TEST_SWEEP],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="per_gpu", storage=f"sqlite:///{tmp_path}/studies.db")
    assert study.user_attrs["workers_joined"] == torch.cuda.device_count()
    assert all(t.user_attrs["device"] == "cuda:0" for t in study.trials)  # each worker sees only its own GPU
