"""Finalists retrained with more seeds, proxy trust, and warm starts, on short studies."""

from __future__ import annotations

import io

import optuna
import pytest
from rich.console import Console

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import FINALIST_OF, FINALIST_SEED
from qkvsearch.search.inspect.finalists import finalists, verdict, within_noise
from qkvsearch.search.inspect.report_text import print_summary
from qkvsearch.search.inspect.selection import counted
from qkvsearch.search.inspect.trust import proxy_trust, trust_warning
from qkvsearch.search.study.sweep import sweep
from tests.conftest import tiny_sweep_conf

State = optuna.trial.TrialState


@pytest.mark.slow
def test_finalists_retrain_the_best_distinct_architectures_with_more_seeds(tmp_path):
    from qkvsearch.search.inspect.choose import select_trial

    cfg = tiny_sweep_conf(tmp_path, "n_trials=4", "pruner=none", "finalists=2", "finalist_seeds=2", "study_name=fin")
    study = sweep(cfg)
    trials = study.get_trials(deepcopy=False)
    search = [t for t in trials if FINALIST_OF not in t.user_attrs]
    extra = [t for t in trials if FINALIST_OF in t.user_attrs]
    assert len(counted(trials)) == 4 == len(search)  # finalists do not count towards n_trials
    complete = sorted((t for t in search if t.state == State.COMPLETE and "duplicate_of" not in t.user_attrs),
                      key=lambda t: t.values[0])
    distinct = []
    for t in complete:
        if t.user_attrs["arch_hash"] not in {d.user_attrs["arch_hash"] for d in distinct}:
            distinct.append(t)
    top = distinct[:2]
    assert sorted((t.user_attrs[FINALIST_OF], t.user_attrs[FINALIST_SEED]) for t in extra) == sorted(
        (o.number, s) for o in top for s in (1, 2))
    by_number = {t.number: t for t in trials}
    for t in extra:
        original = by_number[t.user_attrs[FINALIST_OF]]
        assert t.state == State.COMPLETE and t.user_attrs["arch_hash"] == original.user_attrs["arch_hash"]
        assert "duplicate_of" not in t.user_attrs and t.user_attrs["train_tokens"] == original.user_attrs["train_tokens"]
        assert t.values[0] != original.values[0]  # trained again with another seed, not copied
    table = finalists(study)
    assert {f.trial.number for f in table} == {o.number for o in top}
    assert all(len(f.values) == 3 for f in table) and table[0].mean <= table[1].mean
    expected = (sum(v for v in [by_number[table[0].trial.number].values[0]] + [
        t.values[0] for t in extra if t.user_attrs[FINALIST_OF] == table[0].trial.number])) / 3
    assert table[0].mean == pytest.approx(expected)
    assert verdict(table)  # says whether the top two differ
    # export's best is the best mean over seeds; a second run of the sweep adds nothing
    assert select_trial(study, rule="best").number == table[0].trial.number
    again = sweep(cfg)
    assert len(again.get_trials(deepcopy=False)) == len(trials)
    out = io.StringIO()
    print_summary(again, [], Console(file=out, width=200))
    assert "finalists:" in out.getvalue() and "proxy trust" in out.getvalue()
    from qkvsearch.search.commands.report import render

    page = render(again, run_root=str(tmp_path))
    assert "Finalists: each retrained with more seeds" in page and "Proxy trust" in page


def _study_with(finals: list[float], early: dict[int, list[float]], params: list[int]) -> optuna.Study:
    study = optuna.create_study()
    for i, final in enumerate(finals):
        study.add_trial(optuna.trial.create_trial(
            value=final, intermediate_values={step: values[i] for step, values in early.items()},
            user_attrs={"n_params": params[i], "flops_per_token": 2 * params[i]}))
    return study


def test_proxy_trust_ranks_each_step_and_proxy_against_the_final_values_and_warns_on_a_coin_toss():
    finals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    early = {10: [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # exactly the reverse order: rho -1
             20: [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]}  # the same order: rho 1
    study = _study_with(finals, early, params=[600, 500, 400, 300, 200, 100])
    rows = {r.predictor: r for r in proxy_trust(study)}
    assert list(rows) == ["step 10", "step 20", "n_params", "flops_per_token"]
    assert rows["step 10"].spearman == pytest.approx(-1) and rows["step 10"].kendall == pytest.approx(-1)
    assert rows["step 20"].spearman == pytest.approx(1) and rows["step 20"].n == 6
    assert rows["n_params"].spearman == pytest.approx(-1)  # more parameters, lower loss
    warning = trust_warning(list(rows.values()))
    assert "step 10" in warning and "coin toss" in warning and "-1.00 over 6 finished trials" in warning
    good = _study_with(finals, {10: early[20]}, params=[1] * 6)
    assert trust_warning(proxy_trust(good)) == ""
    assert [r.spearman != r.spearman for r in proxy_trust(good)][1:] == [True, True]  # constant proxies: no figure


def test_two_finalists_within_noise_are_said_to_be():
    from qkvsearch.search.inspect.finalists import Finalist

    trial = optuna.trial.create_trial(value=1.0)
    close = [Finalist(trial, [1.00, 1.10, 0.95]), Finalist(trial, [1.02, 1.08, 0.99])]
    apart = [Finalist(trial, [1.00, 1.01, 0.99]), Finalist(trial, [2.00, 2.01, 1.99])]
    assert within_noise(*close) and not within_noise(*apart)
    assert "within noise" in verdict(close) and "ahead" in verdict(apart)


@pytest.mark.slow
def test_warm_start_queues_the_earlier_best_architectures_that_fit(tmp_path):
    first = sweep(tiny_sweep_conf(tmp_path, "n_trials=4", "pruner=none", "study_name=small", "space=tiny"))
    ranked = sorted((t for t in first.trials if t.state == State.COMPLETE and "duplicate_of" not in t.user_attrs),
                    key=lambda t: t.values[0])
    best_d = ranked[0].params["d_model"]
    # a space without the best trial's width: that architecture does not fit and is skipped
    widths = [w for w in (32, 48, 64) if w != best_d]
    cfg = tiny_sweep_conf(tmp_path, "n_trials=3", "pruner=none", "study_name=big", "warm_start=small", "warm_start_k=3",
                          f"space.params.d_model.choices=[{widths[0]},{widths[1]}]")
    second = sweep(cfg)
    record = second.user_attrs["warm_started_from"]
    assert str(ranked[0].number) in record["skipped"] and "outside this space: d_model=" in record["skipped"][str(ranked[0].number)]
    fitting = [t.number for t in ranked[:3] if t.params["d_model"] != best_d]
    assert record["queued"] == fitting
    firsts = sorted(second.trials, key=lambda t: t.number)[: len(fitting)]
    for trial, number in zip(firsts, fitting, strict=True):
        assert trial.user_attrs["warm_started_from"] == f"small#{number}"
        assert trial.params == first.trials[number].params
        assert trial.user_attrs["arch_hash"] == first.trials[number].user_attrs["arch_hash"]
    assert len(counted(second.get_trials(deepcopy=False))) == 3
    with pytest.raises(QkvError, match=r"warm_start: study 'nope' not found"):
        sweep(tiny_sweep_conf(tmp_path, "n_trials=1", "study_name=other", "warm_start=nope"))


def test_a_lost_finalist_is_queued_again_as_the_same_finalist(tmp_path):
    from qkvsearch.search.study.workers import RetryLost

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=60)
    study = optuna.create_study(storage=storage, study_name="lost")
    study.enqueue_trial({"x": 1.0}, user_attrs={FINALIST_OF: 3, FINALIST_SEED: 2})
    trial = study.ask()
    trial.suggest_float("x", 0, 2)
    trial.set_user_attr("train_tokens", 99)  # a result of the lost run: not carried over
    study.tell(trial, state=State.FAIL)
    RetryLost(2)(study, study.trials[0])
    retry = study.trials[-1]
    assert retry.state == State.WAITING and retry.number == 1
    assert retry.user_attrs == {"retry_of": 0, FINALIST_OF: 3, FINALIST_SEED: 2}


def test_the_warning_is_about_the_step_where_pruning_starts():
    finals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    study = _study_with(finals, {10: [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], 20: finals}, params=[1, 2, 3, 4, 5, 6])
    rows = proxy_trust(study)
    assert "step 10" in trust_warning(rows, None)  # no trial pruned: the first validation
    assert trust_warning(rows, 20) == ""  # the pruner starts at step 20, which ranks well
    study.add_trial(optuna.trial.create_trial(state=State.PRUNED, intermediate_values={10: 9.0, 20: 9.0},
                                              user_attrs={"pruned_reason": "pruned by HyperbandPruner at step 20"}))
    from qkvsearch.search.inspect.trust import first_rung

    assert first_rung(study) == 20


@pytest.mark.slow
def test_every_study_trains_its_spaces_reference_and_says_how_far_the_winner_is_ahead(tmp_path):
    from qkvsearch.search.base.keys import BASELINE
    from qkvsearch.search.commands.report import render
    from qkvsearch.search.inspect.finalists import margin
    from qkvsearch.search.inspect.selection import ranked
    from qkvsearch.search.study.prepare import build_space, build_task

    # a pruner that stops every search trial at its first validation never stops the baseline
    cfg = tiny_sweep_conf(tmp_path, "n_trials=2", "baseline=true", "pruner=threshold", "pruner.upper=0.0",
                          "study_name=stopped")
    study = sweep(cfg)
    reference = build_space(cfg, build_task(cfg)).reference_params()
    (base,) = [t for t in study.get_trials() if BASELINE in t.user_attrs]
    assert base.state == State.COMPLETE and base.params == reference and base.user_attrs[BASELINE] == 0
    assert max(base.intermediate_values) == cfg.trainer.max_steps  # trained in full
    assert len(counted(study.get_trials())) == 2 and not ranked(study)  # not a search trial
    assert margin(study) is None  # no winner to measure
    # with finalists, the baseline gets as many seeds, and the summary, report and test scores say how it compares
    cfg = tiny_sweep_conf(tmp_path, "n_trials=2", "baseline=true", "pruner=none", "finalists=1", "finalist_seeds=1",
                          "study_name=compared")
    study = sweep(cfg)
    bases = sorted((t for t in study.get_trials() if BASELINE in t.user_attrs), key=lambda t: t.user_attrs[BASELINE])
    assert [t.user_attrs[BASELINE] for t in bases] == [0, 1] and all(t.params == reference for t in bases)
    ahead = margin(study)
    assert ahead["seeds"] == 2 and ahead["value"] == pytest.approx(sum(t.value for t in bases) / 2)
    assert ahead["margin"] == pytest.approx(ahead["winner"] - ahead["value"])
    out = io.StringIO()
    print_summary(study, [], Console(file=out, width=200))
    assert "baseline (the space's reference" in out.getvalue() and f"{ahead['value']:.4f}" in out.getvalue()
    assert str(bases[0].number) in study.user_attrs["test_scores"]
    assert "Baseline: the space&#x27;s reference configuration" in render(study)
    assert len(sweep(cfg).get_trials()) == len(study.get_trials())  # resumed: nothing more to train


@pytest.mark.slow
def test_the_finalists_line_counts_the_architectures_there_are(tmp_path, capsys):
    # one architecture only, however many finalists were asked for, and one seed is one seed
    sweep(tiny_sweep_conf(tmp_path, "+space._target_=tests.search.helpers.fixed_space", "n_trials=2", "pruner=none",
                          "finalists=3", "finalist_seeds=1"))
    assert "finalists: 1 more trial retrains the 1 best architecture with 1 more seed each" in capsys.readouterr().out
