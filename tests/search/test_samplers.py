"""TPE with a bounded history (search/study/samplers.py): what it models, and that it still
models what matters (TPE's good group) exactly as the unbounded sampler does."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers._tpe.sampler import _split_trials, default_gamma
from optuna.trial import TrialState, create_trial

from qkvsearch.models.errors import QkvError
from qkvsearch.search.study.prepare import build_sampler
from qkvsearch.search.study.samplers import BoundedTPESampler, HistoryWindow
from tests.conftest import compose_conf

X = {"x": FloatDistribution(0.0, 1.0)}


def value(i: int) -> float:
    return (i * 7919 % 10007) / 10007  # distinct, scattered over [0, 1): the best trials are spread through the history


def filled(n: int, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """A study of ``n`` finished trials, one in three pruned, on an in-memory storage."""
    study = optuna.create_study(sampler=sampler)
    study.add_trials([
        create_trial(state=TrialState.PRUNED, params={"x": value(i)}, distributions=X, intermediate_values={1: 5.0})
        if i % 3 == 2 else create_trial(value=value(i), params={"x": value(i)}, distributions=X)
        for i in range(n)])
    return study


def test_the_window_holds_the_recent_trials_the_best_of_all_time_and_every_running_one():
    study = filled(600)
    old_running = study.ask()  # trial 600, left running while 300 more finish
    study.add_trials([create_trial(value=value(i), params={"x": value(i)}, distributions=X) for i in range(601, 900)])
    running = study.ask()
    trials = study.get_trials(deepcopy=False)
    shown = HistoryWindow(max_history=100, keep_best=25)(trials, study.directions)

    finished = [t for t in trials if t.state.is_finished()]
    numbers = {t.number for t in shown}
    assert {t.number for t in finished[-100:]} <= numbers
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    assert {t.number for t in sorted(complete, key=lambda t: t.value)[:25]} <= numbers
    assert {old_running.number, running.number} <= numbers
    assert len(shown) <= 100 + 25 + 2 < len(trials)


def test_the_good_group_tpe_models_is_the_unbounded_one():
    """TPE's good group is its best gamma(n) = min(ceil(n / 10), 25) trials: from 250 recent
    trials on it is 25, and keep_best=25 makes it the same 25 trials as in the whole study."""
    study = filled(3000)
    trials = study.get_trials(deepcopy=False)
    shown = HistoryWindow(max_history=250, keep_best=25)(trials, study.directions)
    all_below, _ = _split_trials(study, trials, default_gamma(len(trials)))
    window_below, window_above = _split_trials(study, shown, default_gamma(len(shown)))
    assert [t.number for t in window_below] == [t.number for t in all_below]
    assert len(window_above) <= 250  # the bad group comes from the recent trials only


def test_a_trial_older_than_the_window_that_finishes_late_still_counts_among_the_best():
    study = filled(400)
    slow = study.ask()
    study.add_trials([create_trial(value=0.5, params={"x": 0.5}, distributions=X) for _ in range(300)])
    window = HistoryWindow(max_history=100, keep_best=5)
    window(study.get_trials(deepcopy=False), study.directions)  # read while the slow one runs
    study.tell(slow, -1.0)  # the best value of the study, finished after 300 newer trials
    shown = window(study.get_trials(deepcopy=False), study.directions)
    assert slow.number in {t.number for t in shown if t.state == TrialState.COMPLETE}


def test_maximising_keeps_the_highest_values():
    study = optuna.create_study(direction="maximize")
    study.add_trials([create_trial(value=value(i), params={"x": value(i)}, distributions=X) for i in range(500)])
    trials = study.get_trials(deepcopy=False)
    shown = HistoryWindow(max_history=50, keep_best=10)(trials, study.directions)
    top = sorted(trials, key=lambda t: t.value, reverse=True)[:10]
    assert {t.number for t in top} <= {t.number for t in shown}


def test_below_the_bound_it_proposes_exactly_what_optunas_tpe_does():
    def proposals(sampler):
        study = filled(60, sampler)
        out = []
        for _ in range(5):
            trial = study.ask()
            out.append(trial.suggest_float("x", 0.0, 1.0))
            study.tell(trial, out[-1])
        return out

    bounded = proposals(BoundedTPESampler(max_history=1000, seed=3, multivariate=True, constant_liar=True))
    plain = proposals(optuna.samplers.TPESampler(seed=3, multivariate=True, constant_liar=True))
    assert bounded == plain


def test_past_the_bound_tpe_reads_a_window_of_the_study_not_all_of_it(monkeypatch):
    seen: list[int] = []
    split = optuna.samplers._tpe.sampler._split_trials

    def counted(study, trials, n_below):
        seen.append(len(trials))
        return split(study, trials, n_below)

    monkeypatch.setattr(optuna.samplers._tpe.sampler, "_split_trials", counted)
    study = filled(2000, BoundedTPESampler(max_history=100, seed=0, multivariate=True, constant_liar=True))
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0.0, 1.0))
    assert seen and max(seen) <= 100 + 25 + 1


def test_the_default_sampler_is_the_bounded_tpe():
    sampler = build_sampler(compose_conf("sweep", ["sampler=tpe"]), None, 0)
    assert isinstance(sampler, BoundedTPESampler) and sampler.max_history == 1000 and sampler.keep_best == 25
    unbounded = build_sampler(compose_conf("sweep", ["sampler=tpe", "sampler.max_history=null"]), None, 0)
    assert unbounded.max_history is None


@pytest.mark.parametrize(("override", "named"), [("sampler.max_history=0", "sampler.max_history=0"),
                                                  ("sampler.max_history=1.5", "sampler.max_history=1.5"),
                                                  ("sampler.keep_best=-1", "sampler.keep_best=-1")])
def test_a_bad_bound_is_refused_with_the_field_and_what_is_valid(override, named):
    with pytest.raises(QkvError, match=named) as caught:
        build_sampler(compose_conf("sweep", ["sampler=tpe", override]), None, 0)
    assert "InstantiationException" not in str(caught.value)
