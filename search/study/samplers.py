"""TPE with a bounded history, so a suggestion costs about the same at 10,000 trials as at 1,000.

Optuna's TPE rebuilds its model from every finished trial on each suggestion (optuna#2172).
Several passes in Python run over all of them: the split into good and bad trials, which
reads each trial's constraints from its system attributes, the parameter arrays, and the
group decomposition. One suggestion of the `decoder` space took 0.13 s at 1,000 trials and
1.33 s at 10,000; bounded, 0.14 s and 0.16 s (``benchmarks/tpe_history.py``, 3 December
2026, our 2-core CPU).

:class:`BoundedTPESampler` shows TPE a window of the study. The window holds the most recent
``max_history`` finished trials (by number), the ``keep_best`` best complete trials of all
time, and every running trial (for the constant liar). TPE's good group is its best
``min(ceil(n / 10), 25)`` trials (``default_gamma``), weighted uniformly. From
``max_history=250`` on, with ``keep_best`` 25 or more, that group is exactly the unbounded
one: the best 25 complete trials ever run. Only the density of the other trials, g(x),
is estimated from recent ones, and TPE's own weights already count old trials less
(``default_weights``). The effect on search quality is measured on the tabulated benchmark
(docs/benchmarks.md, "Bounded history").
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.models.errors import QkvError


class HistoryWindow:
    """Chooses the trials TPE models: the last ``max_history`` finished trials by number,
    the ``keep_best`` best complete ones before them (per objective), and all running ones.

    The best of the older trials are kept from one call to the next, so a call reads each
    old trial once, not every time: finished trials do not change. One window serves one
    study, as an Optuna sampler does."""

    def __init__(self, max_history: int, keep_best: int) -> None:
        self.max_history, self.keep_best = max_history, keep_best
        self.best: dict[int, FrozenTrial] = {}
        self.read_to = -1  # every older trial numbered up to this one was finished and is in ``best`` if it ranks

    def __call__(self, trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
        finished = [t for t in trials if t.state != TrialState.RUNNING]
        if len(finished) <= self.max_history:
            return list(trials)
        # Optuna's storages list trials by number; finished ones are not reordered
        recent = finished[-self.max_history:]
        cut = recent[0].number
        unread = [t for t in trials if self.read_to < t.number < cut]
        still_running = [t.number for t in unread if t.state == TrialState.RUNNING]
        # read up to the oldest trial still running (it is read when it finishes)
        upto = min(still_running, default=cut) - 1
        fresh = [t for t in unread if t.number <= upto and self._ranks(t)]
        if fresh:
            self.best = self._top([*self.best.values(), *fresh], directions)
        self.read_to = max(self.read_to, upto)
        # finished since a trial older than them, still running, stopped the reading: shown, not kept
        late = [t for t in unread if t.number > upto and self._ranks(t)]
        best = self._top([*self.best.values(), *late], directions) if late else self.best
        shown = {t.number: t for t in (*best.values(), *recent)}
        running = [t for t in trials if t.state == TrialState.RUNNING]
        return sorted(shown.values(), key=lambda t: t.number) + running

    @staticmethod
    def _ranks(trial: FrozenTrial) -> bool:
        return trial.state == TrialState.COMPLETE and trial.values is not None

    def _top(self, pool: list[FrozenTrial], directions: Sequence[StudyDirection]) -> dict[int, FrozenTrial]:
        best: dict[int, FrozenTrial] = {}
        for index, direction in enumerate(directions):
            sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
            for trial in heapq.nsmallest(self.keep_best, pool, key=lambda t: sign * t.values[index]):
                best[trial.number] = trial
        return best


class _Window:
    """The study as TPE sees it: every attribute the study's own, except the trials read.
    They are read and chosen once per trial for each set of states asked for (``seen``),
    where TPE reads them several times for every suggestion."""

    def __init__(self, study: Study, window: HistoryWindow, seen: dict[Any, list[FrozenTrial]]) -> None:
        self._qkv_study, self._qkv_window, self._qkv_seen = study, window, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._qkv_study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        if states is not None and TrialState.COMPLETE not in states:  # not a set TPE models
            return self._qkv_study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        key = (deepcopy, tuple(states) if states is not None else None, use_cache)
        if deepcopy or key not in self._qkv_seen:
            trials = self._qkv_study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
            self._qkv_seen[key] = self._qkv_window(trials, self._qkv_study.directions)
        return self._qkv_seen[key]

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states, use_cache=False)


class BoundedTPESampler(optuna.samplers.TPESampler):
    """:class:`optuna.samplers.TPESampler` that models at most ``max_history`` recent
    finished trials plus the ``keep_best`` best of all time (``max_history=None``: all)."""

    def __init__(self, *, max_history: int | None = 1000, keep_best: int = 25, **kwargs: Any) -> None:
        if max_history is not None and (isinstance(max_history, bool) or not isinstance(max_history, int)
                                        or max_history < 1):
            raise QkvError(f"sampler.max_history={max_history!r}: must be a positive whole number of trials, "
                           "or null for the whole history")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise QkvError(f"sampler.keep_best={keep_best!r}: must be a whole number of trials, 0 or more "
                           "(25 keeps TPE's good group exactly as without the bound)")
        super().__init__(**kwargs)
        self.max_history, self.keep_best = max_history, keep_best
        self._window = HistoryWindow(max_history, keep_best) if max_history is not None else None
        self._seen_for: tuple[int, dict[Any, list[FrozenTrial]]] = (-1, {})

    def _seen(self, study: Study, trial: FrozenTrial) -> Study:
        if self._window is None:
            return study
        if self._seen_for[0] != trial._trial_id:  # a new trial reads the study afresh
            self._seen_for = (trial._trial_id, {})
        return _Window(study, self._window, self._seen_for[1])  # type: ignore[return-value]

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return super().infer_relative_search_space(self._seen(study, trial), trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return super().sample_relative(self._seen(study, trial), trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return super().sample_independent(self._seen(study, trial), trial, param_name, param_distribution)
