"""Checks that need a CUDA device; skipped without one (CI has none)."""

from __future__ import annotations

import pytest
import torch

from qkvsearch.models import build_model, set_attention_path
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


@pytest.mark.slow
def test_a_sweep_trains_its_trials_on_the_gpu(tmp_path):
    import optuna

    from qkvsearch.search.sweep import sweep
    from tests.conftest import tiny_sweep_conf

    cfg = tiny_sweep_conf(tmp_path, "trainer=gpu", "trainer.max_steps=30", "trainer.val_check_interval=10",
                          "trainer.limit_val_batches=2", "n_trials=2", "pruner=none")
    sweep(cfg)
    trials = optuna.load_study(study_name=cfg.study_name, storage=str(cfg.storage.url)).get_trials()
    assert all(t.user_attrs["device"].startswith("cuda") for t in trials)
