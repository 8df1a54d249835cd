"""End-to-end sweeps on real storage with a real Trainer, cut down to seconds."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from safetensors.torch import load_file

from qkvsearch.models import ArchConfig, build_model
from qkvsearch.search.inspect.artifacts import study_run_dir, trial_dir
from qkvsearch.search.study.storage import open_storage
from qkvsearch.search.study.sweep import sweep
from tests.conftest import tiny_sweep_conf

State = optuna.trial.TrialState
pytestmark = pytest.mark.slow


def _load(cfg) -> optuna.Study:
    return optuna.load_study(study_name=cfg.study_name, storage=str(cfg.storage.url))


def test_a_tiny_sweep_leaves_its_trials_in_storage_that_plain_optuna_reads(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "space=tiny", "pruner=none")
    sweep(cfg)
    study = _load(cfg)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == State.COMPLETE for t in trials)
    run_dir = study_run_dir(study, tmp_path)
    for trial in trials:
        attrs = trial.user_attrs
        assert {"n_params", "flops_per_token", "arch_hash", "wall_time_s", "device", "best_step"} <= set(attrs)
        arch = ArchConfig.from_dict(yaml.safe_load((trial_dir(run_dir, trial.number) / "arch.yaml").read_text()))
        assert arch.fingerprint() == attrs["arch_hash"]
        weights = load_file(str(trial_dir(run_dir, trial.number) / "model.safetensors"))
        model = build_model(arch)
        model.load_state_dict(weights)
        assert attrs["n_params"] == sum(p.numel() for p in model.parameters())
        assert (trial_dir(run_dir, trial.number) / "logs" / "metrics.csv").is_file()
        assert sorted(trial.intermediate_values) == [10, 20, 30]
        assert math.isclose(trial.value, min(trial.intermediate_values.values()), rel_tol=1e-6)


def test_a_pruner_that_must_prune_stops_every_trial_at_its_first_validation(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "pruner=none", "pruner._target_=optuna.pruners.ThresholdPruner", "+pruner.upper=0.001")
    sweep(cfg)
    trials = _load(cfg).get_trials()
    assert [t.state for t in trials] == [State.PRUNED] * 3
    for trial in trials:
        assert list(trial.intermediate_values) == [10]
        assert trial.user_attrs["pruned_reason"].startswith("pruned by ThresholdPruner at step 10")


def test_running_again_resumes_and_runs_only_the_missing_trials(tmp_path):
    sweep(tiny_sweep_conf(tmp_path, "n_trials=2"))
    first = {t.number: t.datetime_start for t in _load(tiny_sweep_conf(tmp_path)).get_trials()}
    cfg = tiny_sweep_conf(tmp_path, "n_trials=4")
    sweep(cfg)
    trials = _load(cfg).get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    assert {t.number: t.datetime_start for t in trials if t.number < 2} == first
    sweep(cfg)
    assert len(_load(cfg).get_trials()) == 4


def test_a_trial_that_raises_or_goes_nan_is_recorded_while_the_others_complete(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=4", "+space._target_=tests.search.helpers.flaky_space", "pruner=none")
    sweep(cfg)
    trials = {t.number: t for t in _load(cfg).get_trials()}
    assert trials[1].state == State.PRUNED
    assert trials[1].user_attrs["pruned_reason"].startswith("non-finite loss: training loss became nan")
    assert trials[2].state == State.FAIL
    assert trials[2].user_attrs["fail_reason"] == "RuntimeError: poisoned layer raised on purpose"
    assert "raise RuntimeError(\"poisoned layer raised on purpose\")" in trials[2].user_attrs["traceback"]
    assert trials[0].state == trials[3].state == State.COMPLETE


def test_a_trial_out_of_memory_is_pruned_its_memory_released_and_the_worker_goes_on(tmp_path):
    import gc

    from tests.search import helpers

    helpers.BUILT.clear()
    cfg = tiny_sweep_conf(tmp_path, "n_trials=3", "+space._target_=tests.search.helpers.oom_space", "pruner=none")
    sweep(cfg)
    trials = {t.number: t for t in _load(cfg).get_trials()}
    assert trials[1].state == State.PRUNED
    assert trials[1].user_attrs["pruned_reason"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)"
    assert trials[0].state == trials[2].state == State.COMPLETE
    gc.collect()
    assert len(helpers.BUILT) == 1 and helpers.BUILT[0]() is None, "the trial's model outlived its out-of-memory error"


def test_a_duplicate_architecture_is_not_trained_again(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "+space._target_=tests.search.helpers.fixed_space", "pruner=none")
    sweep(cfg)
    study = _load(cfg)
    trials = study.get_trials()
    assert [t.state for t in trials] == [State.COMPLETE] * 3
    assert "duplicate_of" not in trials[0].user_attrs
    assert [t.user_attrs["duplicate_of"] for t in trials[1:]] == [0, 0]
    assert trials[1].values == trials[0].values == trials[2].values
    assert trial_dir(study_run_dir(study, tmp_path), 0).exists()
    assert not trial_dir(study_run_dir(study, tmp_path), 1).exists()
    assert "train_tokens" in trials[0].user_attrs and "train_tokens" not in trials[1].user_attrs  # nothing trained


def test_a_multi_objective_sweep_yields_a_pareto_front(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=5", "objectives=[val_loss,n_params]", "sampler=nsga2", "space=tiny")
    sweep(cfg)
    study = _load(cfg)
    assert len(study.directions) == 2
    complete = study.get_trials(states=(State.COMPLETE,))
    front = study.best_trials
    assert front
    for trial in complete:
        assert trial.values[1] == trial.user_attrs["n_params"]
    for best in front:
        assert not any(o.values[0] <= best.values[0] and o.values[1] <= best.values[1] and o.values != best.values for o in complete)


def test_an_existing_study_with_other_directions_is_refused_before_any_trial(tmp_path):
    sweep(tiny_sweep_conf(tmp_path, "n_trials=1"))
    with pytest.raises(ValueError, match=r"already exists with directions \['minimize'\].*\['minimize', 'minimize'\]"):
        sweep(tiny_sweep_conf(tmp_path, "n_trials=2", "objectives=[val_loss,latency_ms]"))
    assert len(_load(tiny_sweep_conf(tmp_path)).get_trials()) == 1


def test_a_journal_file_storage_works_the_same(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "storage=journal", "n_trials=2")
    sweep(cfg)
    study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(cfg.storage))
    assert len(study.get_trials(states=(State.COMPLETE, State.PRUNED))) == 2


def test_latency_and_flops_objectives_are_measured_and_recorded(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=2", "objectives=[val_loss,latency_ms,flops_per_token]", "sampler=random")
    sweep(cfg)
    for trial in _load(cfg).get_trials(states=(State.COMPLETE,)):
        assert trial.values[1] == trial.user_attrs["latency_ms"] > 0
        assert trial.values[2] == trial.user_attrs["flops_per_token"]


def test_a_trial_is_reproducible_from_the_seed_and_its_number(tmp_path):
    first = tiny_sweep_conf(tmp_path / "a", "+space._target_=tests.search.helpers.fixed_space", "n_trials=1", "pruner=none")
    second = tiny_sweep_conf(tmp_path / "b", "+space._target_=tests.search.helpers.fixed_space", "n_trials=1", "pruner=none")
    sweep(first)
    sweep(second)
    (a,), (b,) = _load(first).get_trials(), _load(second).get_trials()
    assert a.intermediate_values == b.intermediate_values and a.values == b.values


def test_without_a_terminal_a_sweep_prints_one_line_per_trial_and_no_live_display(tmp_path, capsys):
    cfg = tiny_sweep_conf(tmp_path, "+space._target_=tests.search.helpers.flaky_space", "pruner=none")
    sweep(cfg)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("trial ")]
    assert len(lines) == 3
    assert lines[0].startswith("trial 0: complete, val_loss ")
    assert lines[1].startswith("trial 1: pruned: non-finite loss")
    assert lines[2].startswith("trial 2: failed: RuntimeError: poisoned layer raised on purpose")
    assert "steps/s" not in out and "ETA" not in out


def test_the_live_view_shows_the_running_trials_and_this_workers_step():
    from rich.console import Console

    from qkvsearch.search.study.progress import SweepView

    study = optuna.create_study()
    study.tell(study.ask(), 1.5)
    study.ask()  # another worker's running trial
    view = SweepView(study, n_trials=4)
    view.callback(7)
    view.current.update({"step": 5, "max_steps": 30, "loss": 2.25, "steps_per_s": 12.0})
    console = Console(record=True, width=160)
    console.print(view)
    text = console.export_text()
    assert "trials 1/4" in text and "running 1" in text and "best 1.5000 (trial 0)" in text
    assert "trial 7: step 5/30 | loss 2.2500 | 12.0 steps/s" in text and "ETA" in text


def test_the_summary_describes_each_best_architecture_from_its_layers():
    from rich.console import Console

    from qkvsearch.search.inspect.report_text import print_summary

    arch = ArchConfig.from_dict({"kind": "decoder", "vocab_size": 16, "max_seq_len": 8, "d_model": 32, "positions": "rotary",
                                 "decoder": {"n_layers": 3, "attention": {"n_heads": 4, "n_kv_heads": 2, "masks": ["causal"]},
                                             "layers": [{}, {}, {"ffn": {"d_ff": 64}}]}})
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("arch", arch.to_dict())
    trial.set_user_attr("n_params", 1234)
    study.tell(trial, 1.0)
    console = Console(record=True, width=300)
    print_summary(study, ["study_name=x"], console)
    text = console.export_text()
    assert "d_model 32, rotary; decoder x2: 4h/2kv d_k 8 sqrt_dk causal gelu 128; decoder x1: 4h/2kv d_k 8 sqrt_dk causal gelu 64" in text
    assert "qkv export study_name=x" in text


def test_a_grid_sweep_runs_to_the_end_of_its_grid_and_stops_cleanly(tmp_path):
    # Optuna's GridSampler asks the study to stop once its grid is used up, which raised
    # from tell outside Study.optimize and ended a 648-trial grid sweep with a traceback
    small = ["space=bench", "space.params.n_layers.choices=[1]", "space.params.d_model.choices=[32]",
             "space.params.n_heads.choices=[1]", "space.params.positions.choices=[learned]",
             "space.params.scaling.choices=[sqrt_dk]", "space.params.lr.choices=[3.0e-3]",
             "space.reference.n_layers=1", "space.reference.d_model=32", "space.reference.n_heads=1"]
    cfg = tiny_sweep_conf(tmp_path, *small, "sampler=grid", "pruner=none", "n_trials=2", "trainer.max_steps=10",
                          "trainer.val_check_interval=5")
    study = sweep(cfg)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(t.params["ffn"] for t in trials) == ["gelu", "swiglu"]  # the whole grid, once each
