"""How many writes a trial makes, and when: its first heartbeat with where it runs, its
facts, the space's sampling, its end beside Optuna's tell (a shared database pays each
commit; benchmarks/coordination.py counts them per trial)."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from qkvsearch.search.base.records import database_of, record
from qkvsearch.search.study import workers
from qkvsearch.search.study.prepare import prepare
from qkvsearch.search.study.search import placement, run_trial
from qkvsearch.search.study.storage import HEARTBEAT_ATTR, open_resilient
from qkvsearch.search.study.workers import next_trial
from qkvsearch.spaces import Infeasible
from tests.conftest import tiny_sweep_conf


def _write_transactions(storage: optuna.storages.RDBStorage, action) -> int:
    state = {"dirty": False, "writes": 0}

    def statement(_conn, _cursor, sql, *_):
        state["dirty"] = state["dirty"] or sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE")

    def commit(*_):
        state["writes"] += state["dirty"]
        state["dirty"] = False
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", statement)
    sqlalchemy.event.listen(storage.engine, "commit", commit)
    try:
        action()
    finally:
        sqlalchemy.event.remove(storage.engine, "before_cursor_execute", statement)
        sqlalchemy.event.remove(storage.engine, "commit", commit)
    return state["writes"]


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_trials_first_heartbeat_and_placement_are_one_write_after_it_is_taken(tmp_path, kind):
    """A worker's trial, new or queued, gets its first heartbeat and where it runs in one
    write once it is taken (outside the slot lock); the trial does not write them again."""
    extra = [] if kind == "sqlite" else ["storage=journal", f"storage.path={tmp_path}/studies.journal"]
    cfg = tiny_sweep_conf(tmp_path, "n_trials=4", *extra)
    worker = prepare(cfg).worker
    database, facts = database_of(worker.storage), placement(worker.index)
    taken = []

    def take():
        taken.append(next_trial(worker.study, worker.storage, cfg.storage, 4, worker.retry, facts))
    for queued in (False, True):
        if queued:
            worker.study.enqueue_trial({"n_layers": 2})
        writes = _write_transactions(database, take) if database is not None else take()
        stored = worker.study._storage.get_trial(taken[-1]._trial_id)
        assert stored.state == TrialState.RUNNING and stored.user_attrs == facts
        assert 0 <= time.time() - stored.system_attrs[HEARTBEAT_ATTR] < 60
        assert ("fixed_params" in stored.system_attrs) == queued
        assert taken[-1].user_attrs == facts  # the live trial knows them: run_trial records nothing more
        if database is not None:
            assert writes == 2  # created (or taken from the queue), then started
        worker.study.tell(taken[-1], 1.0)


def test_a_trials_end_is_one_write_beside_the_tell_and_a_reaped_trial_is_left_as_the_reaper_left_it(tmp_path, caplog):
    """How a trial ended (its wall time, why it was pruned or failed, the traceback) is one
    write, then Optuna's tell is another. A trial another worker failed while it ran (its
    heartbeats late) is left failed, with the reaper's reason, whichever way it ends."""
    cfg = tiny_sweep_conf(tmp_path, "n_trials=8")
    worker = prepare(cfg).worker
    database = database_of(worker.storage)

    def pruned(trial):
        raise optuna.TrialPruned("worse than the median at step 40")

    def broken(trial):
        raise RuntimeError("the trial's own bug")

    def reaped(trial):  # what reap_lost writes from another worker
        worker.storage.set_trial_user_attr(trial._trial_id, "fail_reason", "worker lost: no heartbeat for 4 s")
        worker.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)

    def reaped_then_done(trial):
        reaped(trial)
        return [1.0]

    def reaped_then_broken(trial):
        reaped(trial)
        raise RuntimeError("too late")

    lost = "worker lost: no heartbeat for 4 s"
    for objective, writes, state, reason in ((pruned, 2, TrialState.PRUNED, "worse than the median at step 40"),
                                             (broken, 2, TrialState.FAIL, "RuntimeError: the trial's own bug"),
                                             (reaped_then_done, 2, TrialState.FAIL, lost),
                                             (reaped_then_broken, 2, TrialState.FAIL, lost)):
        trial = next_trial(worker.study, worker.storage, cfg.storage, 8, worker.retry, placement(worker.index))
        ran = dataclasses.replace(worker, objective=objective)
        caplog.clear()
        assert _write_transactions(database, lambda ran=ran, trial=trial: run_trial(ran, trial)) == writes
        stored = worker.study._storage.get_trial(trial._trial_id)
        assert stored.state == state and stored.user_attrs.get("pruned_reason", stored.user_attrs.get("fail_reason")) == reason
        assert ("wall_time_s" in stored.user_attrs) == (reason != lost) and ("traceback" in stored.user_attrs) == (objective is broken)
        assert (f"trial {trial.number} was failed by another worker" in caplog.text) == (reason == lost)


def test_an_interrupted_trial_another_worker_failed_already_is_retried_once(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=4")
    worker = prepare(cfg).worker
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # record_interrupted ignores both

    def reaped_then_interrupted(trial):
        worker.storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time() - 10)
        assert workers.reap_lost(worker.study, worker.storage, 1.0, worker.retry) == [trial.number]  # another worker's look
        raise KeyboardInterrupt
    trial = next_trial(worker.study, worker.storage, cfg.storage, 4, worker.retry, placement(worker.index))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_trial(dataclasses.replace(worker, objective=reaped_then_interrupted), trial)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    trials = worker.study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"].startswith("worker lost")
    assert [t.user_attrs.get("retry_of") for t in trials[1:]] == [0]  # one retry, the reaper's


def test_a_trials_facts_are_written_in_one_transaction_and_a_finished_trial_refuses_them(tmp_path):
    cfg = tiny_sweep_conf(tmp_path)
    storage = open_resilient(cfg.storage)
    study = optuna.create_study(storage=storage, study_name="facts")
    trial = study.ask()
    facts = {f"fact{i}": i for i in range(12)}
    assert _write_transactions(database_of(storage), lambda: record(trial, facts)) == 1
    assert _write_transactions(database_of(storage), lambda: [trial.set_user_attr(k, v) for k, v in facts.items()]) == 12
    assert study.trials[0].user_attrs == facts and trial.user_attrs == facts  # stored, and the live trial knows them
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # as set_user_attr raises it
        record(trial, {"late": 1})
    assert "late" not in study.trials[0].user_attrs
    memory = optuna.create_study()  # no database: one write each, the same result
    other = memory.ask()
    record(other, facts)
    assert memory.trials[0].user_attrs == facts


@pytest.mark.parametrize("space_name", ["tiny", "decoder"])
def test_a_sampled_trial_records_its_constraints_and_settings_in_one_transaction(tmp_path, space_name):
    """What the space's sampling records (each constraint value, the optim settings, or why
    it was rejected) is one write on a database, and the same as Optuna's own calls write."""
    from qkvsearch.search.base.records import record_sampled
    from qkvsearch.spaces import record_one_by_one

    prepared = prepare(tiny_sweep_conf(tmp_path, f"space={space_name}"))
    space, database = prepared.worker.objective.space, database_of(prepared.worker.storage)
    study = optuna.create_study(storage=prepared.worker.storage, study_name="sampled",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(6):
        seen = {}
        for write in (record_sampled, record_one_by_one):  # the second trial draws what the first drew
            trial = study.ask()

            def sample(trial=trial, write=write):
                with contextlib.suppress(Infeasible):
                    space.suggest(trial, write=write)
            writes = _write_transactions(database, sample) - len(trial.params)  # each parameter is a write of its own
            stored = study._storage.get_trial(trial._trial_id)
            system = {k: v for k, v in stored.system_attrs.items() if k != "fixed_params"}  # the twin's queue entry
            seen[write] = (writes, stored.params, stored.user_attrs, system, trial.user_attrs)
            study.tell(trial, state=TrialState.PRUNED)
            study.enqueue_trial(stored.params)
        (ours, *stored), (optunas, *theirs) = seen[record_sampled], seen[record_one_by_one]
        assert stored == theirs
        assert ours == 1 and optunas == len(theirs[1]) + sum(k.startswith("constraints:") for k in theirs[2]) > 2
        study.ask()  # the queued twin, out of the way
    from qkvsearch.spaces import ValuesTrial

    stand_in = ValuesTrial(dict(stored[0]))  # fixed values (a warm start's, a reference's): its own calls
    assert space.suggest(stand_in, write=record_sampled).fingerprint() and stand_in.user_attrs == {
        k: v for k, v in stored[1].items() if k == "optim"}
    with pytest.raises(ValueError, match="constraint 'max_params' is NaN"):
        record_sampled(study.ask(), {"max_params": float("nan")}, {})
