"""Finalists: the study's best distinct architectures, trained again with more seeds.

One trial's validation loss is one draw: another seed (initialisation, data order) moves
it. When a single-objective sweep's trials are done, the ``finalists`` best distinct
architectures are each trained ``finalist_seeds`` more times at the full budget, without
pruning. Each retraining is a trial of its own in the study, linked to the trial it repeats
by the user attributes ``finalist_of`` and ``finalist_seed``; finalist trials do not count
towards ``n_trials``, and the study's own rankings (summary, report, test scores, export)
treat each architecture by the mean over its seeds.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import optuna

from qkvsearch.search.base.keys import (
    ARCH_HASH,
    BASELINE,
    DUPLICATE_OF,
    FINALIST_OF,
    FINALIST_SEED,
    is_finalist,
)
from qkvsearch.search.inspect.selection import direction_sign, objective_names, ranked

State = optuna.trial.TrialState
FrozenTrial = optuna.trial.FrozenTrial

def distinct_best(ranked_trials: list[FrozenTrial], k: int) -> list[FrozenTrial]:
    """The first ``k`` trials of a ranking with distinct architectures."""
    seen: set[str] = set()
    chosen = []
    for trial in ranked_trials:
        fingerprint = trial.user_attrs.get(ARCH_HASH, f"trial {trial.number}")
        if fingerprint in seen or DUPLICATE_OF in trial.user_attrs:
            continue
        seen.add(fingerprint)
        chosen.append(trial)
        if len(chosen) == k:
            break
    return chosen


def enqueue_finalists(study: optuna.Study, k: int, seeds: int) -> tuple[int, int]:
    """Queues the retrainings of the ``k`` best distinct architectures (fewer where the study
    has fewer) that the study does not hold yet (queued, running or finished; a failed one
    is queued again); returns how many trials it queued, and for how many architectures."""
    held = {(t.user_attrs[FINALIST_OF], t.user_attrs[FINALIST_SEED]) for t in study.get_trials(deepcopy=False)
            if is_finalist(t) and t.state != State.FAIL}
    queued, architectures = 0, set()
    for original in distinct_best(ranked(study), k):
        for seed in range(1, seeds + 1):
            if (original.number, seed) not in held:
                study.enqueue_trial(original.params, user_attrs={FINALIST_OF: original.number, FINALIST_SEED: seed})
                queued += 1
                architectures.add(original.number)
    return queued, len(architectures)


@dataclasses.dataclass
class Finalist:
    """One architecture's values over its seeds: the original trial first."""

    trial: FrozenTrial  # the original search trial
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def stderr(self) -> float:
        return self.std / math.sqrt(len(self.values)) if len(self.values) > 1 else math.nan


def finalists(study: optuna.Study) -> list[Finalist]:
    """The architectures that have finalist trials, best mean first (empty when none ran)."""
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    values: dict[int, list[float]] = {}
    for trial in trials:
        if is_finalist(trial) and trial.state == State.COMPLETE:
            values.setdefault(trial.user_attrs[FINALIST_OF], []).append(trial.values[0])
    sign = direction_sign(study)
    table = [Finalist(by_number[n], [by_number[n].values[0], *extra]) for n, extra in values.items()
             if by_number[n].state == State.COMPLETE]
    return sorted(table, key=lambda f: (sign * f.mean, f.trial.number))


def within_noise(first: Finalist, second: Finalist) -> bool:
    """True when the two means differ by less than two standard errors of their difference."""
    spread = math.sqrt(first.stderr**2 + second.stderr**2)
    return not math.isnan(spread) and abs(first.mean - second.mean) < 2 * spread


def verdict(table: list[Finalist]) -> str:
    """One line on whether the top architecture is better than the runner-up or within noise."""
    if len(table) < 2:
        return ""
    first, second = table[0], table[1]
    if within_noise(first, second):
        return (f"trials {first.trial.number} and {second.trial.number} are within noise of each other "
                f"(means {first.mean:.4f} and {second.mean:.4f}, difference under two standard errors): "
                "prefer the smaller or faster, or train more seeds")
    return (f"trial {first.trial.number} is ahead of trial {second.trial.number} by more than two standard errors "
            f"({first.mean:.4f} vs {second.mean:.4f} over {len(first.values)} and {len(second.values)} seeds)")


def baseline(study: optuna.Study) -> Finalist | None:
    """The space's reference configuration as the study trained it: its seeds' values, the
    first seed's trial first (None when the study trained no baseline)."""
    trials = sorted((t for t in study.get_trials(deepcopy=False, states=(State.COMPLETE,)) if BASELINE in t.user_attrs),
                    key=lambda t: t.user_attrs[BASELINE])
    return Finalist(trials[0], [t.values[0] for t in trials]) if trials else None


def winner(study: optuna.Study) -> Finalist | None:
    """The search's best architecture over its seeds (the best finalist), or its best trial."""
    table = finalists(study)
    if table:
        return table[0]
    best = ranked(study)
    return Finalist(best[0], [best[0].values[0]]) if best else None


def margin(study: optuna.Study) -> dict[str, float | int | bool | str] | None:
    """How far the winner is ahead of the baseline (``margin``: the winner's mean minus the
    baseline's, in the objective's units; negative is better for a loss), whether that is
    more than two standard errors (``within_noise``), and the line that says so."""
    base, best = baseline(study), winner(study)
    if base is None or best is None or len(study.directions) > 1:
        return None
    name = objective_names(study)[0]
    sign = direction_sign(study)
    diff = best.mean - base.mean
    noise = within_noise(best, base)
    ahead = sign * diff < 0
    verdict = ("within noise of each other" if noise else
               f"{'ahead' if ahead else 'behind'} by more than two standard errors")
    line = (f"baseline (the space's reference, trial {base.trial.number}): {name} {base.mean:.4f}"
            f"{f' ± {base.std:.4f}' if len(base.values) > 1 else ''} over {len(base.values)} seed(s); the winner "
            f"(trial {best.trial.number}, {best.mean:.4f} over {len(best.values)}) is {abs(diff):.4f} "
            f"{'better' if ahead else 'worse'}: {verdict}")
    return {"value": base.mean, "std": base.std, "seeds": len(base.values), "winner": best.mean, "margin": diff,
            "within_noise": noise, "trial": base.trial.number, "line": line}
