"""Choosing the trial a command works on: a number, or a rule over the complete trials."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import N_PARAMS
from qkvsearch.search.inspect.finalists import finalists
from qkvsearch.search.inspect.selection import complete_trial, direction_sign, ranked

#: How ``qkv export`` (and the commands that take a trial) choose among a study's trials.
RULES = ("auto", "best", "smallest_within", "best_under")


def select_trial(study: optuna.Study, trial: int | None = None, rule: str = "auto", within: float | None = None,
                 max_params: int | None = None) -> FrozenTrial:
    """Trial number ``trial``, or the one a rule picks among the complete trials.

    Rules: ``best`` (first objective: the best mean over seeds when the study has
    finalists, else the best trial), ``smallest_within`` (fewest parameters among trials
    whose first objective is within ``within`` of the best, relative), ``best_under`` (best
    first objective with at most ``max_params`` parameters); ``auto`` is ``best`` for a
    single objective and asks for a rule otherwise.

    Raises:
        QkvError: an unknown rule, a rule's missing setting, or no trial it could pick.
    """
    if trial is not None:
        return complete_trial(study, trial)
    if rule not in RULES:
        raise QkvError(f"rule: unknown {rule!r}; valid: {', '.join(RULES)}")
    ranks = ranked(study)
    if not ranks:
        raise QkvError(f"study {study.study_name!r} has no complete trial to export")
    if rule == "auto":
        if len(study.directions) > 1:
            raise QkvError("the study has several objectives: choose rule=best, rule=smallest_within within=0.05, "
                           "rule=best_under max_params=N, or trial=N")
        rule = "best"
    if rule == "best":
        table = finalists(study)  # retrained with more seeds: the mean is the better estimate
        return table[0].trial if table else ranks[0]
    if rule == "smallest_within":
        if within is None or within < 0:
            raise QkvError(f"within: must be a fraction >= 0, got {within}")
        best, sign = ranks[0].values[0], direction_sign(study)
        close = [t for t in ranks if sign * (t.values[0] - best) <= within * abs(best)]
        return min(close, key=lambda t: (t.user_attrs.get(N_PARAMS, 0), sign * t.values[0]))
    if max_params is None:
        raise QkvError("rule=best_under needs max_params=N")
    under = [t for t in ranks if t.user_attrs.get(N_PARAMS, float("inf")) <= max_params]
    if not under:
        smallest = min(t.user_attrs.get(N_PARAMS, 0) for t in ranks)
        raise QkvError(f"no complete trial has at most {max_params:,} parameters (the smallest has {smallest:,})")
    return under[0]
