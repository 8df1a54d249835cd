"""Which trials of a study are best: one ranking and one lookup for every command.

Ties break the same way everywhere: by the first objective, then by fewer parameters,
then by the earlier trial.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.models import ArchConfig
from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import ARCH, ARCH_HASH, N_PARAMS, OBJECTIVES, pinned, reason
from qkvsearch.search.base.records import ARCH_PREFIX


def direction_sign(study: optuna.Study, index: int = 0) -> float:
    """+1 when the study minimises objective ``index``, -1 when it maximises it."""
    return 1.0 if study.directions[index] == optuna.study.StudyDirection.MINIMIZE else -1.0


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objective names (``value0``, ... for a study that records none)."""
    return list(study.user_attrs.get(OBJECTIVES) or [f"value{i}" for i in range(len(study.directions))])


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that have a retry queued, running or finished."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards ``n_trials``: complete, pruned, running and queued
    trials, and failed trials that were not retried; the retrainings of finalists and the
    study's baseline do not."""
    retried = retried_numbers(trials)
    return [t for t in trials if (t.state != TrialState.FAIL or t.number not in retried) and not pinned(t)]


def frozen(study: optuna.Study, number: int) -> FrozenTrial:
    """The stored state of trial ``number`` (looked up by number: no scan of the study)."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def architecture(study: optuna.Study, trial: FrozenTrial) -> ArchConfig:
    """The architecture ``trial`` trained: the study keeps one copy per distinct
    architecture, named by the fingerprint the trial records (studies made before that
    kept it in each trial, and still read).

    Raises:
        QkvError: the trial never got past sampling, so it has no architecture.
    """
    if ARCH in trial.user_attrs:
        return ArchConfig.from_dict(trial.user_attrs[ARCH])
    fingerprint = trial.user_attrs.get(ARCH_HASH)
    stored = study._storage.get_study_system_attrs(study._study_id).get(ARCH_PREFIX + str(fingerprint))
    if fingerprint is None or stored is None:
        raise QkvError(f"trial {trial.number} of study {study.study_name!r} records no architecture "
                       f"(it stopped before sampling one) {reason(trial)}".rstrip())
    return ArchConfig.from_dict(stored)


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The complete search trials (not the retrainings of finalists, nor the baseline), best
    first objective first."""
    sign = direction_sign(study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not pinned(t)]
    return sorted(complete, key=lambda t: (sign * t.values[0], t.user_attrs.get(N_PARAMS, 0), t.number))


def top_trials(study: optuna.Study, k: int = 5) -> list[FrozenTrial]:
    """The Pareto front (by its values) for several objectives, else the ``k`` best trials."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: (t.values, t.number))
    return ranked(study)[:k]


def complete_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number``, which must be complete.

    Raises:
        QkvError: no such trial, or it did not complete (its reason is given).
    """
    trials = study.get_trials(deepcopy=False)
    match = [t for t in trials if t.number == number]
    if not match:
        raise QkvError(f"trial {number} does not exist in study {study.study_name!r} (it has {len(trials)} trials)")
    if match[0].state != TrialState.COMPLETE:
        raise QkvError(f"trial {number} of study {study.study_name!r} is {match[0].state.name}, not COMPLETE "
                       f"{reason(match[0])}".rstrip())
    return match[0]

