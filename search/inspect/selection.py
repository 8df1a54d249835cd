"""Which trials of a study are best: one ranking and one lookup for every command.

Ties break the same way everywhere: by the first objective, then by fewer parameters,
then by the earlier trial.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.models.errors import QkvError
from qkvsearch.search.inspect.finalists import is_finalist


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The complete search trials (not the retrainings of finalists), best first objective first."""
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not is_finalist(t)]
    return sorted(complete, key=lambda t: (sign * t.values[0], t.user_attrs.get("n_params", 0), t.number))


def top_trials(study: optuna.Study, k: int = 5) -> list[FrozenTrial]:
    """The Pareto front (by its values) for several objectives, else the ``k`` best trials."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: (t.values, t.number))
    return ranked(study)[:k]


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The best complete trial of a single-objective study.

    Raises:
        QkvError: several objectives (there is no single best), or no complete trial.
    """
    if len(study.directions) > 1:
        raise QkvError(f"study {study.study_name!r} has several objectives: choose a trial=N from its Pareto front")
    best = ranked(study)
    if not best:
        raise QkvError(f"study {study.study_name!r} has no complete trial")
    return best[0]


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
        reason = match[0].user_attrs.get("pruned_reason") or match[0].user_attrs.get("fail_reason") or ""
        raise QkvError(f"trial {number} of study {study.study_name!r} is {match[0].state.name}, not COMPLETE {reason}".rstrip())
    return match[0]
