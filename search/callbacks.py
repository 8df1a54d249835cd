"""Lightning callbacks of a trial: pruning at every validation, and the best weights."""

from __future__ import annotations

import math

import lightning as L
import optuna
import torch


class MissingMetricError(KeyError):
    """The monitored metric was not logged, so pruning could not work."""


class OptunaPruning(L.Callback):
    """Reports ``monitor`` to the trial after every validation (step: the global step) and
    stops the trial by raising :class:`optuna.TrialPruned` when the pruner says so.

    Unlike a callback that only warns, a missing metric is an error: silently not
    pruning would waste the sweep's budget.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val_loss") -> None:
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise MissingMetricError(
                f"pruning monitors {self.monitor!r}, but validation logged only "
                f"{sorted(trainer.callback_metrics) or 'nothing'}"
            )
        value = float(value)
        step = trainer.global_step
        self.trial.report(value if math.isfinite(value) else float("inf"), step)
        if self.trial.should_prune():
            reason = f"pruned by {type(self.trial.study.pruner).__name__} at step {step} ({self.monitor}={value:.4f})"
            self.trial.set_user_attr("pruned_reason", reason)
            raise optuna.TrialPruned(reason)


class BestWeights(L.Callback):
    """Keeps a CPU copy of the weights at the lowest ``sign * monitor`` (``sign=-1`` for a
    metric to maximise); ``best`` holds that signed value."""

    def __init__(self, monitor: str = "val_loss", sign: float = 1.0) -> None:
        self.monitor, self.sign = monitor, sign
        self.best = math.inf
        self.best_step = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = self.sign * float(trainer.callback_metrics[self.monitor])
        self.history.append((trainer.global_step, value))
        if value < self.best:
            self.best, self.best_step = value, trainer.global_step
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.model.state_dict().items()}
