"""Callbacks of training: pruning at every validation, and the best weights.

A sweep trial's loop (``search/trial/loop.py``, Fabric) calls ``on_validation(step, metrics,
module)``; ``qkv train``'s Trainer calls the Lightning hooks. Both lead to the same code.
"""

from __future__ import annotations

import math

import lightning as L
import optuna
import torch

from qkvsearch.search.base.keys import PRUNED_BY, PRUNED_REASON


class MissingMetricError(KeyError):
    """The monitored metric was not logged, so pruning could not work."""



class OptunaPruning:
    """Reports ``monitor`` to the trial after every validation (step: the optimiser step)
    and stops the trial by raising :class:`optuna.TrialPruned` when the pruner says so.

    Unlike a callback that only warns, a missing metric is an error: silently not
    pruning would waste the sweep's budget. The validation at ``last_step`` is reported
    but never pruned: the trial has trained in full by then, and pruning it would only
    throw its result away (Hyperband's rungs can fall on the last step). With ``prune=False``
    (a finalist's or baseline's seed) it reports its curve and is never stopped.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = "val_loss", last_step: int | None = None,
                 prune: bool = True) -> None:
        self.trial, self.monitor, self.last_step, self.prune = trial, monitor, last_step, prune

    def on_validation(self, step: int, metrics: dict[str, float], module: torch.nn.Module) -> None:
        if self.monitor not in metrics:
            raise MissingMetricError(f"pruning monitors {self.monitor!r}, but validation gave only {sorted(metrics)}")
        value = float(metrics[self.monitor])
        self.trial.report(value if math.isfinite(value) else float("inf"), step)
        if not self.prune or (self.last_step is not None and step >= self.last_step):
            return
        if self.trial.should_prune():
            reason = f"{PRUNED_BY} {type(self.trial.study.pruner).__name__} at step {step} ({self.monitor}={value:.4f})"
            self.trial.set_user_attr(PRUNED_REASON, reason)
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

    def on_validation(self, step: int, metrics: dict[str, float], module: torch.nn.Module) -> None:
        if self.monitor not in metrics:
            return
        value = self.sign * float(metrics[self.monitor])
        self.history.append((step, value))
        if value < self.best:
            self.best, self.best_step = value, step
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.model.state_dict().items()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.on_validation(trainer.global_step, metrics, pl_module)
