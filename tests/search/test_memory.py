"""A trial's memory is estimated before anything is built, and one that cannot fit is pruned."""

from __future__ import annotations

import ctypes
import re

import optuna
import pytest
import torch
import torch.nn.functional as F

from qkvsearch.models import ArchConfig, build_model
from qkvsearch.search.study.sweep import sweep
from qkvsearch.search.trial.hardware import estimate_memory
from tests.conftest import tiny_sweep_conf


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) * 1024


def _measured_step_bytes(arch: ArchConfig, batch: int, seq: int) -> int:
    """Peak resident memory of building the model and one AdamW training step, above before."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # large blocks go back to the system when freed, so the peak is the tensors'
    libc.mallopt(-1, 64 * 1024)
    tokens = torch.randint(0, arch.vocab_size, (batch, seq + 1))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident set
    base = _status("VmRSS")
    model = build_model(arch)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, arch.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    optimizer.step()
    return _status("VmHWM") - base


@pytest.mark.parametrize(("positions", "masks", "ffn"), [
    ("rotary", ["causal"], "gelu"),
    ("alibi", ["causal", {"name": "sliding_window", "window": 32}], "swiglu"),
])
def test_the_estimate_is_within_a_factor_of_two_of_a_measured_step(positions, masks, ffn):
    torch.set_num_threads(1)
    arch = ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": 512, "max_seq_len": 256, "d_model": 128, "positions": positions,
        "decoder": {"n_layers": 3, "attention": {"n_heads": 4, "masks": masks}, "ffn": {"name": ffn}}})
    estimate = estimate_memory(arch, 32, 256).total
    measured = _measured_step_bytes(arch, 32, 256)
    assert measured > 50 * 2**20  # big enough that allocator slack does not decide the comparison
    assert 0.5 < estimate / measured < 2.0, (estimate / 2**20, measured / 2**20)


def test_an_architecture_that_cannot_fit_is_pruned_unbuilt_with_the_figures(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=2", "memory_limit_gb=0.0001", "pruner=none")
    study = sweep(cfg)
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.PRUNED
        reason = trial.user_attrs["pruned_reason"]
        assert re.fullmatch(r"does not fit: needs ~\d+\.\d\d GiB \(weights, gradients and AdamW \d+\.\d\d, activations "
                            r"\d+\.\d\d at batch \d+ x seq \d+\); the machine has 0\.00 GiB free", reason), reason
        assert trial.user_attrs["memory_estimate_mb"] > 0.1
        assert "train_tokens_per_s" not in trial.user_attrs  # nothing was trained
