"""Tensors computed from lengths alone (masks, ALiBi biases, rotary angles, sinusoids) are
made once and reused, without changing what the model computes."""

from __future__ import annotations

import pytest
import torch

from qkvsearch.models import ArchConfig, build_model
from qkvsearch.models.positions import ALiBi
from tests.models.helpers import mask_entries


def _decoder(positions: str, masks=("causal", "sliding_window"), n_layers: int = 3, heads=(4, 4, 2)) -> ArchConfig:
    layers = [{"attention": {"n_heads": heads[i % len(heads)], "masks": mask_entries(masks)}} for i in range(n_layers)]
    return ArchConfig.from_dict({"kind": "decoder", "vocab_size": 11, "max_seq_len": 16, "d_model": 16,
                                 "positions": positions, "decoder": {"n_layers": n_layers, "layers": layers}})


def test_the_masked_alibi_bias_is_built_once_per_head_count_for_the_whole_model(monkeypatch):
    built = []
    original = ALiBi._bias
    monkeypatch.setattr(ALiBi, "_bias", lambda self, *args: built.append(args[:2]) or original(self, *args))
    torch.manual_seed(0)
    model = build_model(_decoder("alibi"))
    tokens = torch.randint(0, 11, (2, 12))
    first = model(tokens)
    torch.testing.assert_close(model(tokens), first)
    assert len(built) == 2  # 3 layers, two head counts (4 and 2), two forward passes
    model(tokens[:, :7])  # another length is another bias
    assert len(built) == 4


@pytest.mark.parametrize("positions", ["alibi", "rotary", "sinusoidal"])
def test_a_cache_filled_during_an_inference_mode_validation_serves_the_next_training_step(positions):
    torch.manual_seed(0)
    model = build_model(_decoder(positions))
    keys = set(model.state_dict())
    tokens = torch.randint(0, 11, (2, 12))
    with torch.inference_mode():  # Lightning validates in inference mode
        expected = model.eval()(tokens)
    model.train()
    out = model(tokens)  # inference tensors could not be saved for backward
    out.square().mean().backward()
    torch.testing.assert_close(out.detach(), expected)  # dropout 0: train and eval agree
    assert set(model.state_dict()) == keys  # caches are not state


def test_caches_follow_the_dtype():
    torch.manual_seed(0)
    model = build_model(_decoder("alibi")).eval()
    tokens = torch.randint(0, 11, (2, 12))
    single = model(tokens)
    double = model.double()(tokens)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-5)
