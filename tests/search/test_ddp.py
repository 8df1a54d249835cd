"""Multi-device trials: DDP over 2 CPU processes (gloo), rank 0 the worker that owns the trial."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import threading
import time

import optuna
import pytest

from qkvsearch.search.study.prepare import build_task
from qkvsearch.search.study.sweep import sweep
from qkvsearch.search.trial.lit import batch_tokens
from tests.conftest import tiny_sweep_conf

State = optuna.trial.TrialState
pytestmark = pytest.mark.slow
DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=30", "trainer.val_check_interval=10"]


def helper_pids() -> list[int]:
    """Processes of this machine running a helper rank."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"qkvsearch.search.trial.ranks" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def ranks_dir(tmp_path: pathlib.Path, number: int) -> pathlib.Path:
    return next(tmp_path.glob(f"*/*/trials/{number:05d}/ranks"))


def test_a_ddp_sweep_trains_each_trial_on_two_ranks_that_agree(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, *DDP, "n_trials=2", "pruner=none")
    study, task = sweep(cfg), build_task(cfg)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.COMPLETE]
    for trial in study.trials:
        assert trial.user_attrs["ranks"] == 2
        helper = json.loads((ranks_dir(tmp_path, trial.number) / "rank1.json").read_text())
        assert helper["outcome"] == "complete"
        with open(ranks_dir(tmp_path, trial.number).parent / "logs" / "metrics.csv") as f:
            rank0 = [float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")]
        # gradients averaged over the ranks keep the weights equal, so the validations are too
        assert helper["metrics"]["val_loss"] == pytest.approx(rank0[-1], rel=1e-5)
        # a step trains on one batch per rank
        assert trial.user_attrs["train_tokens"] == 2 * 30 * batch_tokens(next(iter(task.train_dataloader())))
    assert helper_pids() == []


def test_rank_zeros_pruning_decision_stops_every_rank_at_the_same_step(tmp_path):
    # the pruner prunes every trial at its first report: rank 1, which has no pruner, stops too
    study = sweep(tiny_sweep_conf(tmp_path, *DDP, "n_trials=2", "pruner=threshold", "pruner.upper=0.0"))
    assert [t.state for t in study.trials] == [State.PRUNED, State.PRUNED]
    for trial in study.trials:
        assert list(trial.intermediate_values) == [10]
        helper = json.loads((ranks_dir(tmp_path, trial.number) / "rank1.json").read_text())
        assert helper == {"outcome": "pruned", "reason": trial.user_attrs["pruned_reason"]}
        assert "at step 10" in helper["reason"]
    assert helper_pids() == []


def test_a_killed_rank_fails_its_trial_not_the_study_and_leaves_no_process(tmp_path):
    # trial 0's helper is killed as it starts, before it joins the group; trial 1's once the
    # trial has reported a validation (mid-training); trial 2 runs undisturbed
    cfg = tiny_sweep_conf(tmp_path, *DDP, "n_trials=3", "pruner=none", "trainer.max_steps=300",
                          "trainer.val_check_interval=50")
    storage = f"sqlite:///{tmp_path}/studies.db"
    killed = []

    def trial_reported(number):
        try:
            trials = optuna.load_study(study_name=cfg.study_name, storage=storage).trials
        except KeyError:
            return False
        return len(trials) > number and bool(trials[number].intermediate_values)

    def kill_helpers():
        deadline = time.monotonic() + 240
        while len(killed) < 2 and time.monotonic() < deadline:
            pids = [pid for pid in helper_pids() if pid not in killed]
            if pids and (not killed or trial_reported(1)):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_helpers, daemon=True)
    watcher.start()
    study = sweep(cfg)
    watcher.join()
    assert len(killed) == 2
    states = [t.state for t in study.trials]
    assert states == [State.FAIL, State.FAIL, State.COMPLETE], [t.user_attrs.get("fail_reason") for t in study.trials]
    assert "rank 1 exited with status -9 before it joined" in study.trials[0].user_attrs["fail_reason"]
    assert "rank 1 exited with status -9;" in study.trials[1].user_attrs["fail_reason"]
    assert helper_pids() == []
