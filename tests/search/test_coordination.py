"""What a worker reads on a large shared study (benchmarks/coordination.py measures it):
counts kept from what changed, the study read outside the slot lock and in pieces, an
architecture stored once per study. What a trial writes is in test_trial_writes.py."""

from __future__ import annotations

import contextlib
import random
import weakref

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from qkvsearch.models import ArchConfig
from qkvsearch.search.base.keys import ARCH, ARCH_HASH, BASELINE, FINALIST_OF
from qkvsearch.search.base.records import ARCH_PREFIX, database_of
from qkvsearch.search.inspect.selection import architecture, counted
from qkvsearch.search.study import reader as reader_module
from qkvsearch.search.study import tally as tally_module
from qkvsearch.search.study import workers
from qkvsearch.search.study.prepare import prepare
from qkvsearch.search.study.search import run_trial
from qkvsearch.search.study.storage import open_resilient
from qkvsearch.search.study.tally import COMMIT_HORIZON_S, DatabaseTally, database_counts
from qkvsearch.search.study.workers import RetryLost, Tally, next_trial
from tests.conftest import tiny_sweep_conf


def _random_history(rng: random.Random, n: int) -> list[optuna.trial.FrozenTrial]:
    """A study's trials as a sweep leaves them: finished in every state, finalists and a
    baseline, lost trials failed with their retries queued, running and waiting ones."""
    trials: list[optuna.trial.FrozenTrial] = []
    for number in range(n):
        state = rng.choice([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                            TrialState.WAITING])
        user = {FINALIST_OF: 0} if rng.random() < 0.1 else {BASELINE: True} if rng.random() < 0.05 else {}
        system = {}
        failed = [t.number for t in trials if t.state == TrialState.FAIL]
        if failed and rng.random() < 0.3:
            system["retry_history"] = [rng.choice(failed)]
        trial = optuna.trial.create_trial(state=TrialState.COMPLETE, value=1.0, user_attrs=user, system_attrs=system)
        trial.state, trial.number = state, number
        trials.append(trial)
    return trials


def test_the_tally_counts_what_counted_counts_as_trials_finish_and_retry():
    rng = random.Random(0)
    for _ in range(30):
        trials, tally = _random_history(rng, rng.randint(0, 60)), Tally()
        for _step in range(8):  # some open trials finish, new ones come (a retry of an old failure among them)
            for trial in trials:
                if not trial.state.is_finished() and rng.random() < 0.4:
                    trial.state = rng.choice([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
            trials += [t for t in _random_history(rng, rng.randint(0, 5))]
            for number, trial in enumerate(trials):
                trial.number = number
            counts = tally.update(trials).counts
            assert counts.counted == len(counted(trials))
            assert counts.waiting == any(t.state == TrialState.WAITING for t in trials)
            assert counts.running == any(t.state == TrialState.RUNNING for t in trials)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_database_counts_what_counted_counts(tmp_path, seed):
    rng = random.Random(seed)
    history = _random_history(rng, 80)
    cfg = tiny_sweep_conf(tmp_path)
    storage = open_resilient(cfg.storage)
    study = optuna.create_study(storage=storage, study_name="counts")
    for trial in history:
        ident = study._storage.create_new_trial(study._study_id)
        for key, value in trial.user_attrs.items():
            study._storage.set_trial_user_attr(ident, key, value)
        for key, value in trial.system_attrs.items():
            study._storage.set_trial_system_attr(ident, key, value)
        if trial.state == TrialState.WAITING:
            study._storage.set_trial_state_values(ident, TrialState.WAITING)
        elif trial.state != TrialState.RUNNING:
            study._storage.set_trial_state_values(ident, trial.state, [1.0] if trial.state == TrialState.COMPLETE else None)
    stored = study.get_trials(deepcopy=False)
    assert [t.state for t in stored] == [t.state for t in history]
    counts = database_counts(study, storage)
    assert counts.counted == len(counted(stored)) == Tally().update(stored).counts.counted
    assert (counts.waiting, counts.running) == (TrialState.WAITING in {t.state for t in stored},
                                                TrialState.RUNNING in {t.state for t in stored})


class Clock:
    """Monotonic time the test moves by hand (the tally's commit horizon is in seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _write(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
    """Stores a ``_random_history`` trial as a sweep would leave it: its marks and lineage at creation."""
    ident = study._storage.create_new_trial(study._study_id, template_trial=optuna.trial.create_trial(
        state=TrialState.WAITING, user_attrs=trial.user_attrs, system_attrs=trial.system_attrs))
    if trial.state != TrialState.WAITING:
        study._storage.set_trial_state_values(ident, TrialState.RUNNING)
    return ident


@pytest.mark.parametrize(("seed", "by_id"), [(0, 500), (1, 5)])
def test_the_database_tally_follows_a_study_that_grows_and_finishes_out_of_order(tmp_path, monkeypatch, seed, by_id):
    """Look after look, the incremental count equals the whole study's, while old trials stay
    running, finish and fail, retries and finalists come, and time settles the finished prefix;
    once settled, a look reads the trials since the oldest open one, not the study. (With
    ``by_id`` 5, the marks and lineage are mostly read by range, as on a first look.)"""
    monkeypatch.setattr(tally_module, "_BY_ID", by_id)
    rng, clock = random.Random(seed), Clock()
    storage = open_resilient(tiny_sweep_conf(tmp_path).storage)
    study = optuna.create_study(storage=storage, study_name="grows")
    tally, open_ids = DatabaseTally(study._study_id, clock), []
    for step in range(25):
        for trial in _random_history(rng, rng.randint(0, 12)):
            ident = _write(study, trial)
            if not trial.state.is_finished():
                open_ids.append(ident)
            else:
                study._storage.set_trial_state_values(ident, trial.state, [1.0] if trial.state == TrialState.COMPLETE else None)
        for ident in list(open_ids):
            if rng.random() < (0.3 if step < 20 else 1.0):  # the last steps finish everything
                study._storage.set_trial_state_values(ident, rng.choice([TrialState.COMPLETE, TrialState.FAIL]),
                                                      None)
                open_ids.remove(ident)
        clock.now += 20
        stored = study.get_trials(deepcopy=False)
        counts = tally.update(database_of(storage))
        assert counts.counted == len(counted(stored)), step
        assert counts.waiting == any(t.state == TrialState.WAITING for t in stored)
        assert counts.running == any(t.state == TrialState.RUNNING for t in stored)
    clock.now += COMMIT_HORIZON_S
    tally.update(database_of(storage))
    assert len(stored) > 100 and tally.settled > max(t._trial_id for t in stored)  # everything finished, all settled
    late = study.ask()
    assert tally.update(database_of(storage)).counted == len(counted(stored)) + 1 and tally.rows_read == 1
    study.tell(late, 1.0)


def test_a_row_that_commits_after_a_higher_id_still_counts_within_the_horizon(tmp_path):
    """PostgreSQL draws a trial's id before its transaction commits, so a row can appear after
    rows with higher ids (two workers' finalists queued at once). Within the commit horizon
    the tally still reads it (a count of the unsettled range shows it); settling past it at
    once would miss it for ever."""
    from optuna.storages._rdb import models

    clock = Clock()
    storage = open_resilient(tiny_sweep_conf(tmp_path).storage)
    study = optuna.create_study(storage=storage, study_name="late")
    database = database_of(storage)

    def row(ident: int) -> None:  # a finished trial whose id was drawn earlier than it commits
        with database.scoped_session() as session:
            session.add(models.TrialModel(trial_id=ident, number=ident, study_id=study._study_id,
                                          state=TrialState.PRUNED))
            session.commit()
    for ident in (1, 2, 4):
        row(ident)
    tally = DatabaseTally(study._study_id, clock)
    assert tally.update(database).counted == 3
    clock.now += COMMIT_HORIZON_S / 4
    assert tally.update(database).counted == 3 and tally.rows_read == 0  # unsettled, yet counted, not read again
    clock.now += COMMIT_HORIZON_S / 4
    row(3)  # committed late, within the horizon
    assert tally.update(database).counted == 4 and tally.rows_read == 4  # the count saw a row it had not: read again
    assert tally.update(database).counted == 4 and tally.rows_read == 0
    clock.now += COMMIT_HORIZON_S
    assert tally.update(database).counted == 4 and tally.settled == 5  # the whole prefix is settled now
    assert tally.update(database).counted == 4 and tally.rows_read == 0


class Reads:
    """Counts the trials the database hands over, and which of them came under the lock."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self.storage, self.locked, self.under_lock, self.outside = storage, False, 0, 0
        real = storage._get_trials

        def counting(*args, **kwargs):
            got = real(*args, **kwargs)
            if self.locked:
                self.under_lock += len(got)
            else:
                self.outside += len(got)
            return got
        storage._get_trials = counting


def test_a_worker_joining_a_large_study_takes_a_trial_reading_only_the_open_ones(tmp_path, monkeypatch):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=400", "pruner=none")
    storage = open_resilient(cfg.storage)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name)
    distribution = optuna.distributions.IntDistribution(1, 3)
    study.add_trials([optuna.trial.create_trial(value=float(i % 7), params={"n_layers": 1 + i % 3},
                                                distributions={"n_layers": distribution},
                                                intermediate_values={s: 1.0 for s in range(12)}) for i in range(300)])
    running = study.ask()  # a trial another worker runs, and a queued retry
    study.enqueue_trial({"n_layers": 2})
    fresh = open_resilient(cfg.storage)  # a worker that joins now: nothing of the study in its cache
    reads = Reads(database_of(fresh))
    joined = optuna.load_study(study_name=cfg.study_name, storage=fresh)
    real_lock = workers.slot_lock

    @contextlib.contextmanager
    def watched(*args):
        with real_lock(*args):
            reads.locked = True
            try:
                yield
            finally:
                reads.locked = False
    monkeypatch.setattr(workers, "slot_lock", watched)
    trial = next_trial(joined, fresh, cfg.storage, 400, RetryLost(2))
    assert trial.number == 301 and trial.params == {}  # the queued one, popped
    # a few looks (reaping, the queue) at the 2 open trials, none of the 300 finished: the database counts them
    assert reads.under_lock + reads.outside <= 6
    study.tell(running, 1.0)
    joined.tell(trial, 2.0)
    reads.under_lock = 0
    assert next_trial(joined, fresh, cfg.storage, 400, RetryLost(2)).number == 302
    assert reads.under_lock <= 6


def test_a_sweep_stores_each_architecture_once_and_every_reader_finds_it(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=6", "pruner=none", "trainer.max_steps=10", "trainer.val_check_interval=5",
                          "task=recall", "task.data.n_train=256", "task.data.n_val=64")
    prepared = prepare(cfg)
    worker = prepared.worker
    same = {"n_layers": 1, "d_model": 32, "n_heads": 2, "positions": "rotary", "scaling": "sqrt_dk", "mask": "causal",
            "ffn": "gelu", "ffn_mult": 2}
    worker.study.enqueue_trial(same)
    worker.study.enqueue_trial(same)  # the same architecture twice: one stored copy
    while (trial := next_trial(worker.study, worker.storage, cfg.storage, 6, worker.retry)) is not None:
        run_trial(worker, trial)
    study = optuna.load_study(study_name=cfg.study_name, storage=str(cfg.storage.url))
    stored = {k: v for k, v in study._storage.get_study_system_attrs(study._study_id).items() if k.startswith(ARCH_PREFIX)}
    hashes = {t.user_attrs[ARCH_HASH] for t in study.trials if ARCH_HASH in t.user_attrs}
    assert set(stored) == {ARCH_PREFIX + h for h in hashes}  # one copy per distinct architecture
    assert all(ARCH not in t.user_attrs for t in study.trials)  # none in the trials (the dashboard sends those)
    for trial in study.trials:
        if ARCH_HASH in trial.user_attrs:
            assert architecture(study, trial).fingerprint() == trial.user_attrs[ARCH_HASH]
    old = study.trials[0]  # a study from before keeps the architecture in each trial: still read
    old.user_attrs[ARCH] = stored[ARCH_PREFIX + old.user_attrs[ARCH_HASH]]
    assert architecture(study, old) == ArchConfig.from_dict(old.user_attrs[ARCH])


class Held:
    """The most trial rows (ORM objects) a storage held at once while it read."""

    def __init__(self) -> None:
        from optuna.storages._rdb import models

        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.most = 0
        self.model = models.TrialModel
        sqlalchemy.event.listen(self.model, "load", self.loaded)

    def loaded(self, row, _context) -> None:
        self.alive.add(row)
        self.most = max(self.most, len(self.alive))

    def close(self) -> None:
        sqlalchemy.event.remove(self.model, "load", self.loaded)


def _as_read(trials):
    """Everything a trial holds, comparable (NaN as its repr; a dict's order does not matter)."""
    return repr([(t._trial_id, t.number, t.state, t.values, *(sorted(d.items(), key=repr) for d in (
        t.params, t.distributions, t.user_attrs, t.system_attrs, t.intermediate_values)), t.datetime_start,
        t.datetime_complete) for t in trials])


def test_a_worker_joining_a_large_study_reads_it_in_pieces_and_gets_the_same_trials(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_module, "READ_CHUNK", 4)
    cfg = tiny_sweep_conf(tmp_path, "n_trials=40")
    study = optuna.create_study(storage=open_resilient(cfg.storage), study_name=cfg.study_name)
    distribution = optuna.distributions.IntDistribution(1, 3)
    study.add_trials([optuna.trial.create_trial(value=float(i % 7), params={"n_layers": 1 + i % 3},
                                                distributions={"n_layers": distribution}, user_attrs={"i": i},
                                                intermediate_values={s: 1.0 / (s + 1) for s in range(5)})
                      for i in range(17)])
    running = study.ask()
    kinds = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
             "act": optuna.distributions.CategoricalDistribution([None, True, "gelu", 2.5]),
             "width": optuna.distributions.IntDistribution(32, 256, step=32)}
    study.add_trials([optuna.trial.create_trial(value=float("inf"), params={"lr": 0.01, "act": None, "width": 64},
                                                distributions=kinds, user_attrs={"nested": {"a": [1, 2.5, None]}},
                                                system_attrs={"s": "x"},
                                                intermediate_values={0: float("nan"), 1: float("inf"), 2: -float("inf")}),
                      optuna.trial.create_trial(state=TrialState.FAIL, params={"act": True},
                                                distributions={"act": kinds["act"]}),
                      optuna.trial.create_trial(value=-1.5, params={"act": "gelu"}, distributions={"act": kinds["act"]}),
                      optuna.trial.create_trial(state=TrialState.PRUNED, value=2.0, intermediate_values={3: 2.0})])
    study.enqueue_trial({"n_layers": 3})
    plain = optuna.storages.RDBStorage(str(cfg.storage.url))
    held = Held()
    try:
        fresh = open_resilient(cfg.storage)  # a worker that joins: its cache holds nothing yet
        joined = optuna.load_study(study_name=cfg.study_name, storage=fresh)
        first = joined.get_trials(deepcopy=False)
        assert held.most <= 4  # Optuna's own storage holds all 25 rows at once (below)
        assert _as_read(first) == _as_read(plain.get_all_trials(study._study_id, deepcopy=False))
        study.tell(running, 3.0)  # an open trial finishes, new ones come: the cache's next look is Optuna's
        study.add_trials([optuna.trial.create_trial(value=2.0)] * 2)
        assert _as_read(joined.get_trials(deepcopy=False)) == _as_read(plain.get_all_trials(study._study_id, deepcopy=False))
        assert joined.get_trials(deepcopy=False)[17].values == [3.0] and len(joined.get_trials(deepcopy=False)) == 25
    finally:
        held.close()
    held = Held()
    try:
        plain_study = optuna.load_study(study_name=cfg.study_name, storage=plain)
        assert len(plain_study.get_trials(deepcopy=False)) == 25 and held.most == 25  # what the pieces avoid
    finally:
        held.close()
