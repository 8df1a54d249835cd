"""The backend that trains a sweep's trials for real: memory check, Lightning Fabric's
trial loop, best weights saved as safetensors, speed and compute recorded on the trial."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import optuna
import torch
import yaml

from qkvsearch.models import ArchConfig
from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import (
    ARCH_HASH,
    FLOPS_PER_TOKEN,
    N_PARAMS,
    OPTIM,
    PRUNED_REASON,
    SECONDS_AT,
    TRAIN_TOKENS,
)
from qkvsearch.search.base.records import record
from qkvsearch.search.base.settings import LoopSettings, sign_of
from qkvsearch.search.base.weights import save_weights
from qkvsearch.search.inspect.artifacts import attach_architecture, attach_attention, trial_dir, would_be_best
from qkvsearch.search.trial.callbacks import BestWeights, OptunaPruning
from qkvsearch.search.trial.hardware import estimate_memory, free_memory, model_flops_utilisation, peak_tflops
from qkvsearch.search.trial.lit import LitTransformer
from qkvsearch.search.trial.loop import FitResult, fit
from qkvsearch.search.trial.ranks import helper_ranks
from qkvsearch.tasks.base import model_inputs


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """How every trial of a sweep trains.

    Attributes:
        loop: the trial loop's settings (the ``trainer`` config group).
        optim: ``LitTransformer``'s optimiser settings; a space's sampled ``optim`` overrides them.
        seed: trial N initialises its model from seed ``seed + N`` (reproducible trials).
        compile_backend: run each model through ``torch.compile`` with this backend (None: eager).
        compile_mode: ``torch.compile``'s mode (``reduce-overhead``: CUDA graphs, on CUDA only).
        memory_limit_gb: the most memory a trial may plan to use (None: what the device has free).
        peak_tflops: the device's peak for model FLOP utilisation (None: the known devices' table).
    """

    loop: LoopSettings
    optim: dict[str, Any]
    seed: int = 0
    compile_backend: str | None = None
    compile_mode: str | None = None
    memory_limit_gb: float | None = None
    peak_tflops: float | None = None


@dataclasses.dataclass(frozen=True)
class RankSource:
    """What the helper ranks of a multi-device trial build the same task from: the task's
    ``task.data`` config and the user's plugin modules (``search/trial/ranks.py``)."""

    task_data: dict[str, Any]
    plugins: list[str] = dataclasses.field(default_factory=list)


class Clock:
    """Seconds since the trial's training began at each validation (training and
    validation both count): what a tabulated benchmark reads as each step's cost."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.at: dict[str, float] = {}

    def on_validation(self, step: int, metrics: dict[str, float], module: torch.nn.Module) -> None:
        self.at[str(step)] = round(time.perf_counter() - self.start, 4)


class FabricBackend:
    """Trains a candidate with the trial loop (``search/trial/loop.py``) and records it.

    Args:
        task: the task's LightningDataModule.
        objectives: the study's objectives; the first is trained and pruned on.
        settings: how trials train.
        run_dir: the study's run folder (trials are kept under ``trials/``).
        store: an Optuna artifact store: each trial's arch.yaml, and the attention maps of
            trials that become the best, are attached to them.
        ranks: where a multi-device trial's helper ranks get the task (required then).
        callbacks: more callbacks of the trial loop, made fresh for each trial from it.
    """

    def __init__(self, *, task: Any, objectives: list[str], settings: TrialSettings, run_dir: pathlib.Path,
                 store: Any = None, ranks: RankSource | None = None,
                 callbacks: Callable[[optuna.Trial], list[Any]] | None = None) -> None:
        self.task, self.objectives, self.settings, self.run_dir = task, objectives, settings, run_dir
        self.store, self.ranks = store, ranks
        self.callbacks = callbacks or (lambda trial: [])
        self.monitor = objectives[0]

    def train(self, trial: optuna.Trial, arch: ArchConfig, prune: bool) -> list[float]:
        """Trains the candidate and returns the trial's objective values."""
        self._check_memory(trial, arch)
        folder = trial_dir(self.run_dir, trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "arch.yaml").write_text(yaml.safe_dump(arch.to_dict(), sort_keys=False))
        if self.store is not None:
            attach_architecture(self.store, trial, folder / "arch.yaml")
        lit, best, result = self._fit(trial, arch, folder, prune)
        if best.state is None:
            raise RuntimeError(f"trial {trial.number} finished without a validation of {self.monitor}")
        save_weights(best.state, folder / "model.safetensors", trial.user_attrs[ARCH_HASH])
        measured = {
            **result.metrics, self.monitor: sign_of(self.monitor) * best.best,
            "n_params": float(trial.user_attrs[N_PARAMS]), "flops_per_token": float(trial.user_attrs[FLOPS_PER_TOKEN]),
        }
        facts = {**speed_facts(trial, result, self.settings.peak_tflops), "best_step": best.best_step}
        if "latency_ms" in self.objectives:
            example = model_inputs(self.task.kind, self.task.sample_batch(1))
            measured["latency_ms"] = facts["latency_ms"] = measure_latency_ms(lit.model, example, torch.device(result.device))
        record(trial, facts)  # one write for all of them
        values = [measured[name] for name in self.objectives]
        if self.store is not None and would_be_best(trial.study, values):
            lit.model.load_state_dict(best.state)
            attach_attention(self.store, trial, lit.model.cpu(), self.task)
        return values

    def _check_memory(self, trial: optuna.Trial, arch: ArchConfig) -> None:
        """Prunes, before anything is built, an architecture whose training step would not
        fit the device's free memory (``memory_limit_gb`` caps what counts as free)."""
        batch_size = getattr(self.task, "batch_size", None)
        if not isinstance(batch_size, int):
            return
        loop = self.settings.loop
        estimate = estimate_memory(arch, batch_size, self.task.seq_len, loop.precision)
        trial.set_user_attr("memory_estimate_mb", round(estimate.total / 2**20, 1))
        cuda = str(loop.accelerator) in ("gpu", "cuda") or (loop.accelerator == "auto" and torch.cuda.is_available())
        free, limit = free_memory("cuda" if cuda else "cpu", self.settings.memory_limit_gb)
        if estimate.total > free:
            gib = 2.0**30
            reason = (f"does not fit: needs ~{estimate.total / gib:.2f} GiB (weights, gradients and AdamW "
                      f"{estimate.state / gib:.2f}, activations {estimate.activations / gib:.2f} at batch {batch_size} x "
                      f"seq {self.task.seq_len}); {limit} leaves {free / gib:.2f} GiB")
            trial.set_user_attr(PRUNED_REASON, reason)
            raise optuna.TrialPruned(reason)

    def _fit(self, trial: optuna.Trial, arch: ArchConfig, folder: pathlib.Path,
             prune: bool) -> tuple[LitTransformer, BestWeights, FitResult]:
        """Trains with the trial loop; the pruning callback may raise TrialPruned."""
        loop, seed = self.settings.loop, self.settings.seed + trial.number
        optim = {**self.settings.optim, **trial.user_attrs.get(OPTIM, {}), "max_steps": loop.max_steps}
        helpers = contextlib.nullcontext()
        if loop.world_size > 1:
            if self.ranks is None:
                raise QkvError("a multi-device trial needs a RankSource: its other ranks build the task from it")
            trial.set_user_attr("ranks", loop.world_size)
            spec = {"task_data": self.ranks.task_data, "arch": arch.to_dict(), "seed": seed, "optim": optim,
                    "settings": dataclasses.asdict(loop), "compile_backend": self.settings.compile_backend,
                    "compile_mode": self.settings.compile_mode,
                    "threads": torch.get_num_threads(), "plugins": self.ranks.plugins}
            helpers = helper_ranks(loop.world_size, spec, folder / "ranks")
        L.seed_everything(seed, verbose=False)
        lit = LitTransformer(arch, self.task.kind, **optim)
        best = BestWeights(self.monitor, sign=sign_of(self.monitor))
        clock = Clock()
        callbacks: list[Any] = [best, clock, *self.callbacks(trial)]
        if len(trial.study.directions) == 1:  # Optuna takes intermediate values of single-objective studies
            callbacks.append(OptunaPruning(trial, self.monitor, last_step=loop.max_steps, prune=prune))
        try:
            with helpers:
                result = fit(lit, self.task, loop, callbacks, folder, self.settings.compile_backend,
                             self.settings.compile_mode)
        finally:  # a pruned trial's compute counts too
            record(trial, {TRAIN_TOKENS: lit.tokens_seen, SECONDS_AT: clock.at})
        return lit, best, result


def measure_latency_ms(model: torch.nn.Module, example: list[torch.Tensor], device: torch.device, repeats: int = 10) -> float:
    """Median forward time, in milliseconds, of the model on one example on ``device``."""
    model = model.eval().to(device)
    args = [v.to(device) for v in example]
    with torch.no_grad():
        for _ in range(3):
            model(*args)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def speed_facts(trial: optuna.Trial, result: FitResult, peak_override: float | None = None) -> dict[str, Any]:
    """The trial's device, training tokens/s, model FLOP utilisation (where the device's
    peak is known or given) and peak device memory, as user attributes to record."""
    tokens_per_s = result.tokens / max(result.train_seconds, 1e-9)
    facts: dict[str, Any] = {"device": result.device, "device_name": result.device_name,
                             "train_tokens_per_s": round(tokens_per_s, 1), "compiled": result.compiled}
    mfu = model_flops_utilisation(trial.user_attrs[FLOPS_PER_TOKEN], tokens_per_s / result.world_size,  # per device
                                  peak_tflops(result.device_name, peak_override))
    if mfu is not None:
        facts["mfu"] = float(f"{mfu:.3g}")  # 3 significant digits: a tiny model's share is tiny, not 0
    if result.peak_memory_bytes is not None:
        facts["peak_memory_mb"] = round(result.peak_memory_bytes / 2**20, 1)
    if result.compile_fallback:
        facts["compile_fallback"] = result.compile_fallback
    return facts
