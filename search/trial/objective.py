"""One trial: sample, check, skip duplicates, then hand the candidate to a backend that trains it.

The backend is where a trial's values come from: :class:`~.backend.FabricBackend` trains
with Lightning Fabric; the search benchmark's replay (``benchmarks/simulate.py``) reads a
tabulated learning curve instead. Sampling, the checks, duplicates and pruning decisions
are this module's and the pruning callback's in both, so a strategy replayed on the table
is the code that runs for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import optuna

from qkvsearch.models import ArchConfig, count_parameters, flops_per_token
from qkvsearch.search.base.keys import (
    ARCH_HASH,
    CANDIDATE_HASH,
    DUPLICATE_OF,
    FLOPS_PER_TOKEN,
    N_PARAMS,
    OPTIM,
    PRUNED_REASON,
    pinned,
)
from qkvsearch.search.base.records import record, record_architecture, record_sampled
from qkvsearch.search.trial.duplicates import Waits, candidate_hash, find_duplicate, wait_for_twin
from qkvsearch.search.trial.lit import check_compatible
from qkvsearch.spaces import Infeasible

#: what a duplicate takes from the trial it repeats, besides its values
COPIED_FROM_DUPLICATE = ("best_step", "device", "latency_ms")


def suggest_checked(space: Any, task: Any, trial: optuna.Trial) -> ArchConfig:
    """Samples an architecture and checks it against the task; raises Infeasible (with
    the trial's ``pruned_reason`` set) when it breaks a constraint or does not fit."""
    arch = space.suggest(trial, write=record_sampled)  # its constraints and attributes in one transaction
    try:
        check_compatible(arch, task)
    except ValueError as error:
        trial.set_user_attr(PRUNED_REASON, f"infeasible: {error}")
        raise Infeasible(str(error)) from None
    return arch


def random_draws(space: Any, task: Any, n: int, seed: int = 0) -> Iterator[ArchConfig | Infeasible]:
    """``n`` random trials of ``space``, sampled in a study in memory and checked as a sweep
    checks them: each an architecture, or the Infeasible that rejected it. What ``qkv space
    show`` counts, and what ``trials_per_gpu=auto`` measures the largest trial over."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        try:
            arch = suggest_checked(space, task, trial)
        except Infeasible as error:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            yield error
            continue
        study.tell(trial, 0.0)
        yield arch


class Backend(Protocol):
    """Trains a checked candidate and returns the trial's objective values; may raise
    ``optuna.TrialPruned`` (its pruning callback decided) or any error of the trial's own."""

    def train(self, trial: optuna.Trial, arch: ArchConfig, prune: bool) -> list[float]: ...


class Objective:
    """Samples one candidate per call and returns its objective values.

    Args:
        space: gives ``suggest(trial) -> ArchConfig`` (and records sampled optimiser settings).
        task: the task the candidate must fit (vocabulary, sequence length, classes).
        backend: trains a candidate (:class:`Backend`).
        prune: whether the backend may prune search trials (single-objective studies); a
            finalist's or baseline's trials are never pruned.
        waits: how a trial waits for a twin another worker is training.
    """

    def __init__(self, *, space: Any, task: Any, backend: Backend, prune: bool, waits: Waits | None = None) -> None:
        self.space, self.task, self.backend, self.prune = space, task, backend, prune
        self.waits = waits or Waits()

    def sample(self, trial: optuna.Trial) -> ArchConfig:
        """Samples and checks a candidate; records what it is. Raises Infeasible."""
        arch = suggest_checked(self.space, self.task, trial)
        fingerprint = arch.fingerprint()
        record_architecture(trial, fingerprint, arch.to_dict())
        record(trial, {ARCH_HASH: fingerprint, CANDIDATE_HASH: candidate_hash(arch, trial.user_attrs.get(OPTIM, {})),
                       N_PARAMS: count_parameters(arch), FLOPS_PER_TOKEN: flops_per_token(arch)})
        return arch

    def __call__(self, trial: optuna.Trial) -> list[float]:
        arch = self.sample(trial)
        if pinned(trial):  # a finalist's or baseline's seed: trained in full, never pruned or deduplicated
            return self.backend.train(trial, arch, prune=False)
        key = trial.user_attrs[CANDIDATE_HASH]
        twin = wait_for_twin(trial.study, trial, key, self.waits)
        if twin is not None and twin.state == optuna.trial.TrialState.PRUNED:
            trial.set_user_attr(DUPLICATE_OF, twin.number)
            raise optuna.TrialPruned(f"the same candidate as trial {twin.number}, which was pruned while this waited")
        duplicate = find_duplicate(trial.study, key, trial.number)
        if duplicate is not None:
            trial.set_user_attr(DUPLICATE_OF, duplicate.number)
            for name in COPIED_FROM_DUPLICATE:
                if name in duplicate.user_attrs:
                    trial.set_user_attr(name, duplicate.user_attrs[name])
            return list(duplicate.values)
        return self.backend.train(trial, arch, prune=self.prune)
