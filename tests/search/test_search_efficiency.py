"""benchmarks/search_efficiency.py counts the compute trials really spent."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import statistics
import sys

import optuna
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["task=recall", "task.data.n_train=512", "task.data.n_val=128", "task.data.n_pairs=4", "trainer.max_steps=30",
        "trainer.val_check_interval=10", "trainer.limit_val_batches=2"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("search_efficiency", ROOT / "benchmarks" / "search_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_efficiency"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_benchmark_counts_the_tokens_each_trial_trained(tmp_path, monkeypatch):
    bench = load_benchmark()
    studies: list[optuna.Study] = []
    from qkvsearch.search.study import sweep as run

    real_sweep = run.sweep
    monkeypatch.setattr(run, "sweep", lambda cfg: studies.append(real_sweep(cfg)) or studies[-1])
    result = bench.main(["--quick", "--strategies", "random", "random+hyperband", "--seeds", "1", "--trials", "4",
                         "--override", *TINY, "--out", str(tmp_path / "eff")])
    runs, table = result["runs"], result["table"]
    assert [len(runs["random"]), len(runs["random+hyperband"])] == [1, 1]
    assert len(studies) == 2 and (tmp_path / "eff.png").stat().st_size > 0 and (tmp_path / "eff.json").is_file()

    from qkvsearch.search.study.prepare import task_of_study

    task = task_of_study(studies[0])
    per_step = next(iter(task.train_dataloader()))["tokens"].numel()  # tokens one training step reads
    counted = 0
    order = [runs["random"][0], runs["random+hyperband"][0]]
    for study, costs in zip(studies, order, strict=True):
        by_number = {t.number: t for t in study.trials}
        for cost in costs:
            trial = by_number[cost.number]
            if "duplicate_of" in trial.user_attrs or str(trial.user_attrs.get("pruned_reason", "")).startswith("infeasible"):
                expected_steps = 0  # not trained
            elif trial.state == optuna.trial.TrialState.PRUNED:
                expected_steps = max(trial.intermediate_values)  # pruned right after this validation
            else:
                expected_steps = 30
            assert cost.tokens == expected_steps * per_step, (trial.number, trial.state, cost)
            assert cost.flops == 3 * trial.user_attrs["flops_per_token"] * cost.tokens
            counted += cost.tokens
    assert counted > 0
    bests = [min(c.value for c in costs if c.value is not None) for costs in runs["random"]]
    assert table["target"] == statistics.median(bests)
    for strategy, row in table["strategies"].items():
        for needed, costs in zip(row["tokens"]["needed"], runs[strategy], strict=True):
            best = min((c.value for c in costs if c.value is not None), default=math.inf)
            assert math.isfinite(needed) == (best <= table["target"])
