"""What a sweep shows while it runs: live counts and the current trial on a terminal, and
one line per finished trial everywhere (a log file or a pipe gets only those lines)."""

from __future__ import annotations

import time
from typing import Any

import optuna
from rich.console import Console, Group
from rich.text import Text

from qkvsearch.search.base.keys import DUPLICATE_OF, FAIL_REASON, PRUNED_REASON, RETRY_OF
from qkvsearch.search.inspect.report_text import progress_line
from qkvsearch.search.inspect.selection import counted

State = optuna.trial.TrialState


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class TrialProgress:
    """Feeds the current trial's step, loss and speed to a :class:`SweepView` (at most
    twice a second, so reading the loss costs nothing that matters); a callback of the
    trial's loop."""

    def __init__(self, view: SweepView, number: int) -> None:
        self.view, self.number = view, number
        self.start = self.last = time.monotonic()

    def on_train_step(self, step: int, max_steps: int, loss: Any) -> None:
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        self.view.current = {"number": self.number, "step": step, "max_steps": max_steps,
                             "loss": float(loss), "steps_per_s": step / max(now - self.start, 1e-9)}


class SweepView:
    """The live display: the study's counts (read every 2 s), this worker's trial, elapsed
    time and an ETA from the pace so far."""

    def __init__(self, study: optuna.Study, n_trials: int) -> None:
        self.study, self.n_trials = study, n_trials
        self.start = time.monotonic()
        self.current: dict[str, Any] = {}
        self._counts: tuple[float, Text, int] = (-1e9, Text(""), 0)

    def callback(self, number: int) -> TrialProgress:
        self.current = {"number": number}
        return TrialProgress(self, number)

    def __rich__(self) -> Group:
        now = time.monotonic()
        if now - self._counts[0] > 2.0:
            trials = self.study.get_trials(deepcopy=False)
            done = sum(t.state.is_finished() for t in counted(trials))
            self._counts = (now, progress_line(self.study, self.n_trials), done)
        _, counts, done = self._counts
        elapsed = now - self.start
        eta = f" | ETA {_duration(elapsed / done * (self.n_trials - done))}" if 0 < done < self.n_trials else ""
        lines = [counts, Text(f"elapsed {_duration(elapsed)}{eta}")]
        c = self.current
        if "step" in c:
            lines.append(Text(f"trial {c['number']}: step {c['step']}/{c['max_steps']} | loss {c['loss']:.4f} | "
                              f"{c['steps_per_s']:.1f} steps/s"))
        elif c:
            lines.append(Text(f"trial {c['number']}: starting"))
        return Group(*lines)


def trial_line(trial: optuna.trial.FrozenTrial, objectives: list[str]) -> str:
    """One line about a finished trial: its outcome, values or reason, and time."""
    seconds = trial.user_attrs.get("wall_time_s", 0.0)
    retry = f" (retry of {trial.user_attrs[RETRY_OF]})" if RETRY_OF in trial.user_attrs else ""
    head = f"trial {trial.number}{retry}: "
    if trial.state == State.COMPLETE:
        values = ", ".join(f"{name} {value:.4g}" for name, value in zip(objectives, trial.values, strict=False))
        same = f", same candidate as trial {trial.user_attrs[DUPLICATE_OF]}" if DUPLICATE_OF in trial.user_attrs else ""
        return f"{head}complete, {values}{same} ({seconds:.1f} s)"
    if trial.state == State.PRUNED:
        return f"{head}pruned: {trial.user_attrs.get(PRUNED_REASON, 'pruned')} ({seconds:.1f} s)"
    if trial.state == State.FAIL:
        return f"{head}failed: {str(trial.user_attrs.get(FAIL_REASON, 'its worker died')).splitlines()[0][:200]}"
    return f"{head}{trial.state.name.lower()}"


def print_trial(console: Console, trial: optuna.trial.FrozenTrial, objectives: list[str]) -> None:
    """Prints :func:`trial_line` (above the live display when there is one)."""
    console.print(trial_line(trial, objectives), highlight=False, soft_wrap=True)
