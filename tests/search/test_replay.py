"""The replay simulator (search/study/replay.py) on synthetic tables over the real bench space."""

from __future__ import annotations

import statistics

import optuna
import pytest
from omegaconf import OmegaConf

from qkvsearch.search.study.replay import Conductor, replay
from tests.conftest import compose_conf
from tests.search.tables import TABLE_TRAINER, write_table

N = 648  # the bench space's configurations


def final(i: int) -> float:
    """Configuration i's last loss: a permutation of 648 distinct values in [2, 3)."""
    return 2.0 + (i * 7919 % N) / N


def curve(i: int, k: int, seed: int) -> float:
    return final(i) + 1.0 / (1 + k) + 0.01 * seed


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("table") / "t.json.gz", curve)


def strategy(*overrides: str):
    return compose_conf("sweep", [*TABLE_TRAINER, *overrides])


def test_the_conductor_runs_workers_one_at_a_time_in_simulated_time_order():
    conductor, seen = Conductor(), []

    def worker(spends):
        def work(index):
            for seconds in spends:
                conductor.spend(index, seconds)
                seen.append((conductor.now, index))
        return work

    conductor.run([worker([3, 3]), worker([2, 2, 2])])
    assert seen == [(2, 1), (3, 0), (4, 1), (6, 0), (6, 1)]  # a tie goes to the worker that asked first


@pytest.mark.parametrize("workers", [1, 4])
def test_a_replay_is_a_function_of_its_seed(table, workers):
    cfg = strategy("sampler=tpe", "pruner=hyperband")
    first, again, other = (replay(cfg, table, workers=workers, seed=seed, budget_trials=15) for seed in (3, 3, 4))
    assert first.curve == again.curve and first.trials == again.trials
    assert [t.params for t in first.study.trials] == [t.params for t in again.study.trials]
    assert [t.params for t in first.study.trials] != [t.params for t in other.study.trials]
    assert first.pruned > 0 and first.tokens >= 15 * table.full_trial_tokens


def test_each_trial_counts_the_tokens_it_trained_and_a_duplicate_none(table):
    trace = replay(strategy("sampler=random", "pruner=sha"), table, workers=2, seed=0, budget_trials=20)
    finished = [t for t in trace.study.trials if t.state.is_finished()]
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in finished)
    for trial in finished:
        if "duplicate_of" in trial.user_attrs:
            assert "train_tokens" not in trial.user_attrs
        else:
            assert trial.user_attrs["train_tokens"] == max(trial.intermediate_values) * table.tokens_per_step
    assert sum(t.user_attrs.get("train_tokens", 0) for t in finished) <= trace.tokens


def test_a_strategy_that_always_picks_the_tables_best_reaches_regret_zero(table):
    best = min(table.entries.values(), key=lambda entry: entry.value)
    cfg = strategy("pruner=none")
    cfg.sampler = OmegaConf.create({"_target_": "optuna.samplers.PartialFixedSampler", "fixed_params": best.params,
                                    "base_sampler": {"_target_": "optuna.samplers.RandomSampler"}})
    trace = replay(cfg, table, seed=0, budget_trials=3, max_trials=10)
    assert trace.curve[0][0] == table.full_trial_tokens == trace.tokens  # its first trial, then nothing more to train
    assert trace.value_at(trace.tokens) - table.best_value == 0.0
    assert (trace.trials, trace.duplicates) == (10, 9)  # the rest repeat it, for free


@pytest.mark.slow
def test_random_search_needs_the_compute_its_closed_form_says(tmp_path):
    """Random search, one seed a configuration (no noise), until the incumbent is one of the
    G best of N: duplicates cost nothing, so the configurations trained come in a uniformly
    random order without repeats, and the expected number trained is (N + 1) / (G + 1)."""
    exact = write_table(tmp_path / "exact.json.gz", lambda i, k, s: final(i) + 1.0 / (1 + k), seeds=1)
    good = 65
    target = sorted(entry.value for entry in exact.entries.values())[good - 1]
    cfg = strategy("sampler=random", "pruner=none")
    trained = [replay(cfg, exact, seed=seed, budget_trials=N, stop_at=target).compute_to(target) / exact.full_trial_tokens
               for seed in range(150)]
    expected = (N + 1) / (good + 1)
    error = statistics.stdev(trained) / len(trained) ** 0.5
    assert abs(statistics.fmean(trained) - expected) < 3 * error, (statistics.fmean(trained), expected, error)
