"""Our own pruners, on curves whose fate is known."""

from __future__ import annotations

import optuna
import pytest

from qkvsearch.search.trial.pruners import CurvePruner


def study_with_finals(pruner, finals):
    study = optuna.create_study(pruner=pruner)
    x = optuna.distributions.FloatDistribution(0, 1)
    for value in finals:
        study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": x}, value=value,
                                                  intermediate_values={600: value}))
    return study


def stopped(study, curve):
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for step, value in curve:
        trial.report(value, step)
        if trial.should_prune():
            return step
    return None


def test_a_slow_starter_that_learns_fast_runs_on_and_a_flat_curve_is_stopped():
    pruner = CurvePruner(max_resource=600, n_startup_trials=5, n_warmup_steps=200)
    study = study_with_finals(pruner, [2.0, 2.1, 2.2, 2.3, 2.4])
    # 3.0 -> 2.2 over steps 100..300: the line in log(step) reaches ~1.7 at 600, below the best (2.0)
    assert stopped(study, [(100, 3.0), (200, 2.6), (300, 2.2)]) is None
    # flat at 2.5: no line reaches 2.0; stopped at the first step past the warm-up
    assert stopped(study, [(100, 2.5), (200, 2.5), (300, 2.5)]) == 200
    # the same flat curve with a margin of 0.6 runs on
    lenient = study_with_finals(CurvePruner(max_resource=600, n_warmup_steps=200, margin=0.6), [2.0] * 5)
    assert stopped(lenient, [(100, 2.5), (200, 2.5), (300, 2.5)]) is None


def test_nothing_is_stopped_before_the_start_up_trials_complete():
    study = study_with_finals(CurvePruner(max_resource=600, n_startup_trials=5), [2.0] * 4)
    assert stopped(study, [(100, 9.0), (200, 9.0), (300, 9.0)]) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_resource": 0}, r"max_resource must be >= 1, got 0"),
    ({"max_resource": 600, "window": 1}, r"window must be >= 2 validations to fit a line, got 1"),
    ({"max_resource": 600, "n_warmup_steps": -1}, r"n_warmup_steps \(-1\) must be >= 0"),
])
def test_bad_settings_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurvePruner(**kwargs)
