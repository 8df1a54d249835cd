"""A trial's memory is estimated before anything is built, and one that cannot fit is pruned."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import re
import subprocess
import sys

import optuna
import pytest
import torch
import torch.nn.functional as F

from qkvsearch.models import ArchConfig, build_model
from qkvsearch.search.study.sweep import sweep
from qkvsearch.search.trial.hardware import estimate_memory
from tests.conftest import SWEEP_CMD, TEST_SWEEP, tiny_sweep_conf
from tests.search.faults import SHORT as SHORT_TASK


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
                            r"\d+\.\d\d at batch \d+ x seq \d+\); memory_limit_gb=0\.0001 leaves 0\.00 GiB", reason), reason
        assert trial.user_attrs["memory_estimate_mb"] > 0.1
        assert "train_tokens_per_s" not in trial.user_attrs  # nothing was trained


def test_cgroup_limits_are_read_from_v2_and_v1_layouts_and_their_ancestors(tmp_path):
    from qkvsearch.search.trial.hardware import cgroup_limits

    v2 = tmp_path / "v2"
    (v2 / "jobs" / "job7").mkdir(parents=True)
    (v2 / "jobs" / "memory.max").write_text(f"{4 * 2**30}\n")
    (v2 / "jobs" / "memory.current").write_text(f"{2**30}\n")
    (v2 / "jobs" / "job7" / "memory.max").write_text("max\n")  # unlimited itself; its parent is not
    (tmp_path / "cgroup2").write_text("0::/jobs/job7\n")
    assert [free for free, _ in cgroup_limits(tmp_path / "cgroup2", v2)] == [3 * 2**30]
    v1 = tmp_path / "v1"
    (v1 / "memory" / "slurm" / "job9").mkdir(parents=True)
    (v1 / "memory" / "slurm" / "job9" / "memory.limit_in_bytes").write_text(f"{2**31}\n")
    (v1 / "memory" / "slurm" / "job9" / "memory.usage_in_bytes").write_text(f"{2**29}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    (tmp_path / "cgroup1").write_text("4:memory:/slurm/job9\n3:cpu:/\n")
    (free, why), = cgroup_limits(tmp_path / "cgroup1", v1)
    assert free == 2**31 - 2**29 and "memory.limit_in_bytes 2.00 GiB" in why


def test_ulimit_v_caps_what_a_trial_may_plan_to_take():
    code = ("import resource; from qkvsearch.search.trial.hardware import free_memory\n"
            "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize:')).split()[1]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))\n"
            "free, why = free_memory('cpu'); print(free, why)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    free, why = result.stdout.split(" ", 1)
    assert int(free) <= 2**30 and why.startswith("ulimit -v (RLIMIT_AS"), result.stderr


def _memory_cgroup() -> pathlib.Path | None:
    """This process's cgroup v1 memory folder, where a child can be made (root), else None."""
    with contextlib.suppress(OSError, StopIteration):
        lines = open("/proc/self/cgroup").read().splitlines()
        path = next(line.split(":", 2)[2] for line in lines if ":memory:" in line)
        folder = pathlib.Path("/sys/fs/cgroup/memory") / path.strip().lstrip("/")
        if os.access(folder, os.W_OK):
            return folder
    return None


@pytest.mark.slow
def test_a_sweep_in_a_small_cgroup_prunes_what_would_not_fit_instead_of_being_killed(tmp_path):
    parent = _memory_cgroup()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory controller here")
    group = parent / f"qkv-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(2500 * 2**20))  # 2.5 GB, far below the machine's
        args = ["+space._target_=tests.search.helpers.wide_space", "n_trials=1", "pruner=none", f"run_root={tmp_path}"]
        code = (f"import os, subprocess, sys; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
                f"sys.exit(subprocess.run({[*SWEEP_CMD, *SHORT_TASK, *args, *TEST_SWEEP]!r}).returncode)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        (trial,) = optuna.load_study(study_name="recall-tiny", storage=f"sqlite:///{tmp_path}/studies.db").trials
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert re.search(rf"; the cgroup {re.escape(str(group))} \(memory\.limit_in_bytes 2\.44 GiB", trial.user_attrs["pruned_reason"])
    finally:
        group.rmdir()
