"""Pruners of our own, chosen by config like Optuna's (``conf/pruner/``).

:class:`CurvePruner` stops a trial when an optimistic extrapolation of its own learning
curve cannot reach the best final value so far: the validation loss is fitted as a straight
line in log(step) over the trial's last ``window`` validations, and carried to the last
step. Learning curves flatten as they go (a power law is a straight line in log-log), so
the line promises more than the trial will deliver, which keeps the rule on the side of
letting trials run; a trial is stopped only when even that promise falls short of the
incumbent by ``margin``. Unlike successive halving it compares each trial with where it
could end, not with where others stood at the same step, so a slow starter that learns
fast is kept (cf. Domhan et al., 2015, "Speeding up automatic hyperparameter optimization
of deep neural networks by extrapolation of learning curves", for the idea with a richer
curve model).
"""

from __future__ import annotations

import math

import numpy as np
import optuna


class CurvePruner(optuna.pruners.BasePruner):
    """Prunes when the extrapolated final value is worse than the best complete trial's.

    Args:
        max_resource: the step a trial ends at (its full budget).
        n_startup_trials: complete trials needed before anything is pruned.
        n_warmup_steps: no pruning before this step.
        window: how many of the last validations the line is fitted over (at least 2).
        margin: how much worse than the best the extrapolation may be and still run
            (in the objective's units; negative prunes harder).
    """

    def __init__(self, max_resource: int, n_startup_trials: int = 5, n_warmup_steps: int = 0, window: int = 3,
                 margin: float = 0.0) -> None:
        if max_resource < 1:
            raise ValueError(f"max_resource must be >= 1, got {max_resource}")
        if n_startup_trials < 0 or n_warmup_steps < 0:
            raise ValueError(f"n_startup_trials ({n_startup_trials}) and n_warmup_steps ({n_warmup_steps}) must be >= 0")
        if window < 2:
            raise ValueError(f"window must be >= 2 validations to fit a line, got {window}")
        self.max_resource, self.n_startup_trials, self.n_warmup_steps = max_resource, n_startup_trials, n_warmup_steps
        self.window, self.margin = window, margin

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < self.n_startup_trials:
            return False
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        curve = sorted((s, sign * v) for s, v in trial.intermediate_values.items() if math.isfinite(v))
        if len(curve) < min(self.window, 2) or not complete:
            return False
        best = min(sign * t.value for t in complete)
        return self.extrapolate(curve[-self.window:]) > best + self.margin

    def extrapolate(self, points: list[tuple[int, float]]) -> float:
        """The fitted line's value at ``max_resource``, never above the last value (a curve
        that rose is not extrapolated to rise further)."""
        steps = np.log([s for s, _ in points])
        values = np.array([v for _, v in points])
        slope = float(np.polyfit(steps, values, 1)[0]) if len(set(steps)) > 1 else 0.0
        slope = min(slope, 0.0)
        return float(values[-1] + slope * (math.log(self.max_resource) - steps[-1]))
