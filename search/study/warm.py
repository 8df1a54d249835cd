"""Warm start: an earlier study's best architectures as the first trials of a new one.

``warm_start=STUDY`` (``warm_start_storage=URL`` when it lives elsewhere) queues the
``warm_start_k`` best distinct architectures of that study, once, before the new study's
first trial. An architecture is queued only where it fits: each of its parameters that
this space also has must be one of this space's values, and the architecture it gives must
pass this task's checks (a parameter this space lacks is dropped; one the earlier space
lacked is sampled). The sampler then learns from these trials like any other; they count
towards ``n_trials``. The study records what was queued and why the rest were not
(``warm_started_from``), and which queued architectures could be
checked only when they run (a parameter the earlier space lacked is drawn by the sampler).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import WARM_STARTED_FROM
from qkvsearch.search.inspect.finalists import distinct_best
from qkvsearch.search.inspect.selection import ranked
from qkvsearch.search.trial.objective import suggest_checked
from qkvsearch.spaces import Infeasible, Lacking, Space, ValuesTrial, outside


def space_distributions(space: Any) -> dict[str, BaseDistribution] | None:
    """The Optuna name and distribution of every parameter a declarative space may sample
    (None for a Python function space, whose parameters are known only when it runs)."""
    if not isinstance(space, Space):
        return None
    return {name: param.distribution for param in space.params for name in space.optuna_names(param)}


def warm_start(study: optuna.Study, source: optuna.Study, k: int, space: Any, task: Any) -> dict[str, Any]:
    """Queues ``source``'s ``k`` best distinct architectures that fit ``space`` and ``task``
    in ``study``; returns (and records in the study) what was queued and what was not."""
    if len(source.directions) != len(study.directions):
        raise QkvError(f"warm_start: study {source.study_name!r} has {len(source.directions)} objectives, "
                       f"this one {len(study.directions)}")
    distributions = space_distributions(space)
    queued, skipped, unchecked = [], {}, {}
    for trial in distinct_best(ranked(source), k):
        params = dict(trial.params)
        if distributions is not None:
            bad = [f"{name}={value!r}" for name, value in params.items()
                   if name in distributions and outside(value, distributions[name])]
            if bad:
                skipped[str(trial.number)] = f"outside this space: {', '.join(bad)}"
                continue
            params = {name: value for name, value in params.items() if name in distributions}
            try:  # the architecture these values give must pass this task's checks
                suggest_checked(space, task, ValuesTrial(params))
            except Infeasible as error:
                skipped[str(trial.number)] = f"infeasible here: {error}"
                continue
            except Lacking as missing:  # a parameter the earlier space lacked: the sampler draws it when it runs
                unchecked[str(trial.number)] = f"{missing.args[0]} is drawn by the sampler; checked when it runs"
        study.enqueue_trial(params, user_attrs={WARM_STARTED_FROM: f"{source.study_name}#{trial.number}"})
        queued.append(trial.number)
    record = {"study": source.study_name, "queued": queued, "skipped": skipped, "unchecked": unchecked}
    study.set_user_attr(WARM_STARTED_FROM, record)
    return record
