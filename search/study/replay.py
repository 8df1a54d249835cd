"""Replaying a search strategy on a tabulated benchmark, on simulated time.

A table (``benchmarks/build_table.py``) holds every configuration of a discrete space
trained in full, with its learning curve and the seconds each validation took, once per
training seed. A replay runs the sweep's own code on it: the sampler and pruner built from
their configs (:func:`~.prepare.build_sampler`, the ``pruner`` group), the space's sampling
and checks, duplicates and twins (:class:`~..trial.objective.Objective`), the pruning
callback, the worker's slot decisions (:func:`~.workers.take_slot`) and a trial's
bookkeeping (:func:`~.search.run_trial`). Only the backend differs: :class:`TableBackend`
reads a trial's curve from the table (one of its seeds, drawn per trial) where
:class:`~..trial.backend.FabricBackend` would train, and lets simulated time pass for each
validation. ``k`` workers run as threads, one at a time in simulated-time order, so a replay
is a function of its seed alone.
"""

from __future__ import annotations

import dataclasses
import gzip
import heapq
import itertools
import json
import math
import pathlib
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig

from qkvsearch.models import ArchConfig
from qkvsearch.search.base.keys import DUPLICATE_OF, TRAIN_TOKENS
from qkvsearch.search.study.prepare import Worker, build_sampler, space_for
from qkvsearch.search.study.search import run_trial
from qkvsearch.search.study.workers import WAIT, RetryLost, take_slot
from qkvsearch.search.trial.callbacks import OptunaPruning
from qkvsearch.search.trial.duplicates import Waits
from qkvsearch.search.trial.objective import Objective
from qkvsearch.tasks.base import TaskSizes


def config_key(params: dict[str, Any]) -> str:
    """A configuration's key in the table: its parameters, sorted, as JSON."""
    return json.dumps({name: params[name] for name in sorted(params)})


@dataclasses.dataclass(frozen=True)
class Run:
    """One training of a configuration: the validation loss and the seconds since training
    began, at each of the table's steps."""

    val_loss: tuple[float, ...]
    seconds: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    params: dict[str, Any]
    flops_per_token: int
    runs: tuple[Run, ...]

    @property
    def value(self) -> float:
        """What the configuration is worth: the mean over its seeds of the best validation
        loss of each run (what a trial of it reports)."""
        return float(np.mean([min(run.val_loss) for run in self.runs]))


@dataclasses.dataclass
class Table:
    """A tabulated benchmark: every configuration's runs, at the same validation steps."""

    steps: list[int]
    tokens_per_step: int
    sizes: TaskSizes
    entries: dict[str, Entry]
    built: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Table:
        with gzip.open(path, "rt") as handle:
            data = json.load(handle)
        entries = {}
        for config in data["configs"]:
            runs = tuple(Run(tuple(r["val_loss"]), tuple(r["seconds"])) for r in config["runs"])
            entries[config_key(config["params"])] = Entry(config["params"], int(config["flops_per_token"]), runs)
        return cls(list(data["steps"]), int(data["tokens_per_step"]), TaskSizes(**data["task"]), entries,
                   data.get("built", {}))

    @property
    def full_trial_tokens(self) -> int:
        """The tokens one trial trains at the full budget."""
        return self.steps[-1] * self.tokens_per_step

    @property
    def best_value(self) -> float:
        return min(entry.value for entry in self.entries.values())

    def entry(self, params: dict[str, Any]) -> Entry:
        """The configuration a trial sampled.

        Raises:
            KeyError: naming the parameters, when the table does not hold them.
        """
        try:
            return self.entries[config_key(params)]
        except KeyError:
            raise KeyError(f"the table has no configuration {config_key(params)}") from None


class BudgetSpent(BaseException):
    """The replay's compute budget is spent: every worker stops where it is (a BaseException,
    so a trial's own error handling lets it through)."""


class Conductor:
    """Simulated time for worker threads: exactly one runs at a time, and a worker that lets
    ``seconds`` pass waits until every other worker's clock has caught up with its own (ties
    go to the lower worker index)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, int]] = []
        self._order = itertools.count()
        self._turn: dict[int, threading.Event] = {}
        self.stopped = False

    def run(self, workers: list[Callable[[int], None]]) -> None:
        """Runs ``workers[i](i)`` for every i, each in its own thread, until all return or stop."""
        threads = []
        for index, work in enumerate(workers):
            self._turn[index] = threading.Event()
            heapq.heappush(self._queue, (0.0, next(self._order), index))
            threads.append(threading.Thread(target=self._thread, args=(index, work), name=f"replay-{index}"))
        for thread in threads:
            thread.start()
        self._next()
        for thread in threads:
            thread.join()

    def _thread(self, index: int, work: Callable[[int], None]) -> None:
        self._wait(index)
        try:
            work(index)
        except BudgetSpent:
            pass
        finally:
            self._next()

    def _wait(self, index: int) -> None:
        self._turn[index].wait()
        self._turn[index].clear()
        if self.stopped:
            raise BudgetSpent

    def _next(self) -> None:
        if self._queue:
            self.now, _, index = heapq.heappop(self._queue)
            self._turn[index].set()

    def spend(self, index: int, seconds: float) -> None:
        """Lets ``seconds`` of simulated time pass for worker ``index``."""
        if self.stopped:
            raise BudgetSpent
        heapq.heappush(self._queue, (self.now + max(0.0, seconds), next(self._order), index))
        self._next()
        self._wait(index)

    def stop(self) -> None:
        """Ends the replay: every waiting worker raises :class:`BudgetSpent` when woken."""
        self.stopped = True
        for event in self._turn.values():
            event.set()
        self._queue.clear()


@dataclasses.dataclass
class Ledger:
    """The compute a replay spends, and the incumbent after each change: the configuration
    with the best value a trial reported, judged by what it is worth (its table value)."""

    budget_tokens: float
    stop_at: float = -math.inf  # end the replay once the incumbent is worth this or better
    tokens: float = 0.0
    flops: float = 0.0
    best_reported: float = math.inf
    #: (tokens, FLOPs, simulated seconds, the incumbent's table value) at each change of incumbent
    curve: list[tuple[float, float, float, float]] = dataclasses.field(default_factory=list)

    def spend(self, tokens: float, flops_per_token: int, conductor: Conductor) -> None:
        """Counts a rung's training; ends the replay once the budget is spent."""
        self.tokens += tokens
        self.flops += 3.0 * flops_per_token * tokens
        if self.tokens >= self.budget_tokens:
            conductor.stop()
            raise BudgetSpent

    def complete(self, reported: float, worth: float, conductor: Conductor) -> None:
        """A trial completed, reporting ``reported``; it is the incumbent if no trial reported better."""
        if reported < self.best_reported:
            self.best_reported = reported
            self.curve.append((self.tokens, self.flops, conductor.now, worth))
            if worth <= self.stop_at:
                conductor.stop()
                raise BudgetSpent


class TableBackend:
    """Reads a trial's learning curve from the table instead of training: one of the
    configuration's seeds, drawn per trial; each validation's loss goes to the pruning
    callback after its seconds have passed on the simulated clock."""

    def __init__(self, table: Table, conductor: Conductor, ledger: Ledger, index: int, seed: int) -> None:
        self.table, self.conductor, self.ledger, self.index, self.seed = table, conductor, ledger, index, seed

    def train(self, trial: optuna.Trial, arch: ArchConfig, prune: bool) -> list[float]:
        entry = self.table.entry(trial.params)
        run = entry.runs[np.random.default_rng([self.seed, trial.number]).integers(len(entry.runs))]
        pruning = OptunaPruning(trial, "val_loss", last_step=self.table.steps[-1], prune=prune)
        best, done, elapsed = math.inf, 0, 0.0
        for step, value, seconds in zip(self.table.steps, run.val_loss, run.seconds, strict=True):
            self.conductor.spend(self.index, seconds - elapsed)
            self.ledger.spend((step - done) * self.table.tokens_per_step, entry.flops_per_token, self.conductor)
            done, elapsed, best = step, seconds, min(best, value)
            trial.set_user_attr(TRAIN_TOKENS, done * self.table.tokens_per_step)
            pruning.on_validation(step, {"val_loss": value}, None)
        self.ledger.complete(best, entry.value, self.conductor)
        return [best]


@dataclasses.dataclass
class Trace:
    """What one replay did: the incumbent curve and the trials it ran."""

    curve: list[tuple[float, float, float, float]]
    tokens: float
    trials: int
    complete: int
    pruned: int
    duplicates: int
    study: optuna.Study | None = None  # the replay's study, in memory

    def value_at(self, tokens: float) -> float:
        """The incumbent's table value once ``tokens`` were spent (inf before the first)."""
        value = math.inf
        for spent, _, _, worth in self.curve:
            if spent > tokens:
                break
            value = worth
        return value

    def compute_to(self, target: float, weight: int = 0) -> float:
        """Tokens (``weight=0``) or FLOPs (``1``) spent when the incumbent first reached ``target``."""
        return next((point[weight] for point in self.curve if point[3] <= target), math.inf)


def replay(cfg: DictConfig, table: Table, workers: int = 1, seed: int = 0, budget_trials: float = 100.0,
           wait_s: float = 5.0, stop_at: float = -math.inf, max_trials: int | None = None) -> Trace:
    """One replay of the strategy ``cfg`` describes (its ``sampler``, ``pruner`` and ``space``,
    with ``trainer`` set to the table's steps) with ``workers`` asynchronous workers, until
    ``budget_trials`` full trials' tokens are spent, the incumbent is worth ``stop_at``, or
    the study holds ``max_trials`` trials (default 20 per full trial of budget: a strategy
    that only proposes what it has already trained spends nothing)."""
    max_trials = max_trials if max_trials is not None else int(20 * budget_trials) + 20
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space = space_for(cfg, table.sizes)
    storage = optuna.storages.InMemoryStorage()
    name = f"replay-{seed}"  # Hyperband assigns brackets by a hash of the study's name and the trial number
    optuna.create_study(storage=storage, study_name=name, directions=["minimize"])
    conductor, ledger = Conductor(), Ledger(budget_trials * table.full_trial_tokens, stop_at)
    seeded = cfg.copy()
    if "seed" in cfg.sampler:
        seeded.sampler.seed = seed
    crew = []
    for index in range(workers):
        study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(seeded, space, index),
                                  pruner=instantiate(cfg.pruner))
        waits = Waits(poll_s=wait_s, pause=lambda seconds, i=index: conductor.spend(i, seconds))
        objective = Objective(space=space, task=table.sizes, backend=TableBackend(table, conductor, ledger, index, seed),
                              prune=True, waits=waits)
        crew.append(Worker(study, storage, None, RetryLost(0), objective, index, None))

    def work(index: int) -> None:
        while (slot := take_slot(crew[index].study, n_trials=max_trials)) is not None:
            if slot == WAIT:
                conductor.spend(index, wait_s)
            else:
                run_trial(crew[index], slot)

    conductor.run([work] * workers)
    trials = crew[0].study.get_trials(deepcopy=False)
    state = optuna.trial.TrialState
    return Trace(ledger.curve, ledger.tokens, len(trials), sum(t.state == state.COMPLETE for t in trials),
                 sum(t.state == state.PRUNED for t in trials), sum(DUPLICATE_OF in t.user_attrs for t in trials),
                 crew[0].study)
