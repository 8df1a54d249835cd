"""One trial: sample, check, skip duplicates, build, train with Lightning, record."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import pathlib
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import optuna
import torch
import yaml
from safetensors.torch import save_file

from qkvsearch.models import ArchConfig, count_parameters, flops_per_token
from qkvsearch.models.errors import QkvError
from qkvsearch.search.inspect.artifacts import attach_architecture, attach_attention, trial_dir, would_be_best
from qkvsearch.search.inspect.finalists import is_finalist
from qkvsearch.search.study.devices import estimate_memory, free_memory, model_flops_utilisation, peak_tflops
from qkvsearch.search.study.settings import LoopSettings
from qkvsearch.search.study.workers import wait_for_twin
from qkvsearch.search.trial.callbacks import BestWeights, OptunaPruning
from qkvsearch.search.trial.lit import LitTransformer, check_compatible, model_inputs
from qkvsearch.search.trial.loop import FitResult, fit
from qkvsearch.search.trial.ranks import helper_ranks
from qkvsearch.spaces import Infeasible


def candidate_hash(arch: ArchConfig, optim: dict[str, Any]) -> str:
    """What makes two trials the same candidate: the architecture and the optimiser
    settings the space sampled (the architecture's fingerprint alone when it sampled none)."""
    fingerprint = arch.fingerprint()
    if not optim:
        return fingerprint
    return hashlib.sha256(json.dumps([fingerprint, sorted(optim.items())]).encode()).hexdigest()[:16]


def same_candidate(trial: optuna.trial.FrozenTrial, key: str) -> bool:
    """True when ``trial`` trained the candidate ``key`` (trials made before candidates had
    their own key carry the architecture's)."""
    return trial.user_attrs.get("candidate_hash", trial.user_attrs.get("arch_hash")) == key


def find_duplicate(study: optuna.Study, key: str, number: int) -> optuna.trial.FrozenTrial | None:
    """Returns the earliest complete trial that trained the same candidate."""
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.number != number and same_candidate(other, key):
            return other
    return None


class Clock:
    """Seconds since the trial's training began at each validation (training and
    validation both count): what a tabulated benchmark reads as each step's cost."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.at: dict[str, float] = {}

    def on_validation(self, step: int, metrics: dict[str, float], module: torch.nn.Module) -> None:
        self.at[str(step)] = round(time.perf_counter() - self.start, 4)


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


def suggest_checked(space: Any, task: Any, trial: optuna.Trial) -> ArchConfig:
    """Samples an architecture and checks it against the task; raises Infeasible (with
    the trial's ``pruned_reason`` set) when it breaks a constraint or does not fit."""
    arch = space.suggest(trial)
    try:
        check_compatible(arch, task)
    except ValueError as error:
        trial.set_user_attr("pruned_reason", f"infeasible: {error}")
        raise Infeasible(str(error)) from None
    return arch


class Objective:
    """Trains one sampled architecture per call and returns the objective values.

    Args:
        space: gives ``suggest(trial) -> ArchConfig``.
        task: the task's LightningDataModule.
        run_dir: the study's run folder (trials are kept under ``trials/``).
        objectives: names from :data:`qkvsearch.search.study.settings.OBJECTIVES`; the first is trained and pruned on.
        settings: the trial loop's settings (the ``trainer`` config group).
        optim: ``LitTransformer`` optimiser settings.
        prune: report to the pruner (single-objective studies only).
        callbacks: more callbacks of the trial loop (see ``search/trial/loop.py``), made fresh for
            each trial from it.
        store: an Optuna artifact store: each trial's arch.yaml, and the attention maps
            of trials that become the best, are attached to them.
        seed: trial N initialises its model from seed ``seed + N`` (reproducible trials).
        poll_s: how often a trial waiting for another worker's trial of the same
            architecture looks again.
        reap: fails trials of dead workers (so a wait for one of them ends).
        memory_limit_gb: the most memory a trial may plan to use (null: what the device has free).
        peak_tflops: the device's peak for model FLOP utilisation (null: the known devices' table).
        compile_backend: run each trial's model through ``torch.compile`` with this backend (None: eager).
        task_data: the task's ``task.data`` config, from which the helper ranks of a
            multi-device trial build the same task (``search/trial/ranks.py``).
        plugins: the user's modules those ranks import first (the ``plugins`` setting).
    """

    def __init__(self, *, space: Any, task: Any, run_dir: pathlib.Path, objectives: list[str],
                 settings: LoopSettings, optim: dict[str, Any], prune: bool,
                 callbacks: Callable[[optuna.Trial], list[Any]] | None = None, store: Any = None, seed: int = 0,
                 poll_s: float = 5.0, reap: Callable[[], None] = lambda: None,
                 memory_limit_gb: float | None = None, peak_tflops: float | None = None,
                 compile_backend: str | None = None, task_data: dict[str, Any] | None = None,
                 plugins: list[str] | None = None) -> None:
        self.space, self.task, self.run_dir = space, task, run_dir
        self.objectives, self.settings, self.optim = objectives, settings, optim
        self.prune = prune
        self.callbacks = callbacks or (lambda trial: [])
        self.store, self.seed, self.poll_s, self.reap = store, seed, poll_s, reap
        self.monitor = objectives[0]
        self.memory_limit_gb, self.peak_tflops = memory_limit_gb, peak_tflops
        self.compile_backend = compile_backend
        self.task_data, self.plugins = task_data, list(plugins or [])

    def sample(self, trial: optuna.Trial) -> ArchConfig:
        """Samples and checks an architecture; records its counts. Raises Infeasible."""
        arch = suggest_checked(self.space, self.task, trial)
        trial.set_user_attr("arch_hash", arch.fingerprint())
        trial.set_user_attr("candidate_hash", candidate_hash(arch, trial.user_attrs.get("optim", {})))
        trial.set_user_attr("n_params", count_parameters(arch))
        trial.set_user_attr("flops_per_token", flops_per_token(arch))
        trial.set_user_attr("arch", arch.to_dict())
        return arch

    def __call__(self, trial: optuna.Trial) -> list[float]:
        arch = self.sample(trial)
        if is_finalist(trial):  # a retraining with another seed: trained in full, never pruned or deduplicated
            return self._train(trial, arch, prune=False)
        key = trial.user_attrs["candidate_hash"]
        twin = wait_for_twin(trial.study, trial, key, self.poll_s, self.reap)
        if twin is not None and twin.state == optuna.trial.TrialState.PRUNED:
            trial.set_user_attr("duplicate_of", twin.number)
            raise optuna.TrialPruned(f"the same architecture as trial {twin.number}, which was pruned while this waited")
        duplicate = find_duplicate(trial.study, key, trial.number)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate.number)
            for key in ("best_step", "device", "latency_ms"):
                if key in duplicate.user_attrs:
                    trial.set_user_attr(key, duplicate.user_attrs[key])
            return list(duplicate.values)
        return self._train(trial, arch, prune=self.prune)

    def _train(self, trial: optuna.Trial, arch: ArchConfig, prune: bool) -> list[float]:
        """Trains a sampled architecture and returns the trial's objective values."""
        self._check_memory(trial, arch)
        folder = trial_dir(self.run_dir, trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "arch.yaml").write_text(yaml.safe_dump(arch.to_dict(), sort_keys=False))
        if self.store is not None:
            attach_architecture(self.store, trial, folder / "arch.yaml")
        lit, best, result = self._fit(trial, arch, folder, prune)
        if best.state is None:
            raise RuntimeError(f"trial {trial.number} finished without a validation of {self.monitor}")
        save_file(best.state, str(folder / "model.safetensors"), metadata={"arch_hash": trial.user_attrs["arch_hash"]})
        device = torch.device(result.device)
        measured = {
            "val_loss": best.best if self.monitor == "val_loss" else result.metrics["val_loss"],
            "val_acc": -best.best if self.monitor == "val_acc" else result.metrics.get("val_acc", float("nan")),
            "n_params": float(trial.user_attrs["n_params"]),
            "flops_per_token": float(trial.user_attrs["flops_per_token"]),
        }
        if "latency_ms" in self.objectives:
            example = model_inputs(self.task.kind, self.task.sample_batch(1))
            measured["latency_ms"] = measure_latency_ms(lit.model, example, device)
            trial.set_user_attr("latency_ms", measured["latency_ms"])
        trial.set_user_attr("best_step", best.best_step)
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
        estimate = estimate_memory(arch, batch_size, self.task.seq_len, self.settings.precision)
        trial.set_user_attr("memory_estimate_mb", round(estimate.total / 2**20, 1))
        accelerator = str(self.settings.accelerator)
        cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        free = free_memory("cuda" if cuda else "cpu", self.memory_limit_gb)
        if estimate.total > free:
            gib = 2.0**30
            reason = (f"does not fit: needs ~{estimate.total / gib:.2f} GiB (weights, gradients and AdamW "
                      f"{estimate.state / gib:.2f}, activations {estimate.activations / gib:.2f} at batch {batch_size} x "
                      f"seq {self.task.seq_len}); the {'GPU' if cuda else 'machine'} has {free / gib:.2f} GiB free")
            trial.set_user_attr("pruned_reason", reason)
            raise optuna.TrialPruned(reason)

    def _fit(self, trial: optuna.Trial, arch: ArchConfig, folder: pathlib.Path,
             prune: bool) -> tuple[LitTransformer, BestWeights, FitResult]:
        """Trains with the trial loop (Lightning Fabric); the pruning callback may raise TrialPruned."""
        optim = {**self.optim, **trial.user_attrs.get("optim", {}), "max_steps": self.settings.max_steps}
        world = self.settings.world_size
        ranks = contextlib.nullcontext()
        if world > 1:
            if self.task_data is None:
                raise QkvError("a multi-device trial needs the task's config (Objective task_data) to start its other ranks")
            trial.set_user_attr("ranks", world)
            spec = {"task_data": self.task_data, "arch": arch.to_dict(), "seed": self.seed + trial.number, "optim": optim,
                    "settings": dataclasses.asdict(self.settings), "compile_backend": self.compile_backend,
                    "threads": torch.get_num_threads(), "plugins": self.plugins}
            ranks = helper_ranks(world, spec, folder / "ranks")
        L.seed_everything(self.seed + trial.number, verbose=False)
        lit = LitTransformer(arch, self.task.kind, **optim)
        best = BestWeights(self.monitor, sign=-1.0 if self.monitor == "val_acc" else 1.0)
        clock = Clock()
        callbacks: list[Any] = [best, clock, *self.callbacks(trial)]
        if prune:
            callbacks.append(OptunaPruning(trial, self.monitor, last_step=self.settings.max_steps))
        try:
            with ranks:
                result = fit(lit, self.task, self.settings, callbacks, folder, self.compile_backend)
        finally:  # a pruned trial's compute counts too
            trial.set_user_attr("train_tokens", lit.tokens_seen)
            trial.set_user_attr("seconds_at", clock.at)
        record_speed(trial, result, self.peak_tflops)
        return lit, best, result


def record_speed(trial: optuna.Trial, result: FitResult, peak_override: float | None = None) -> None:
    """The trial's device, training tokens/s, model FLOP utilisation (where the device's
    peak is known or given) and peak device memory, as user attributes."""
    tokens_per_s = result.tokens / max(result.train_seconds, 1e-9)
    trial.set_user_attr("device", result.device)
    trial.set_user_attr("device_name", result.device_name)
    trial.set_user_attr("train_tokens_per_s", round(tokens_per_s, 1))
    mfu = model_flops_utilisation(trial.user_attrs["flops_per_token"], tokens_per_s / result.world_size,  # per device
                                  peak_tflops(result.device_name, peak_override))
    if mfu is not None:
        trial.set_user_attr("mfu", float(f"{mfu:.3g}"))  # 3 significant digits: a tiny model's share is tiny, not 0
    if result.peak_memory_bytes is not None:
        trial.set_user_attr("peak_memory_mb", round(result.peak_memory_bytes / 2**20, 1))
    trial.set_user_attr("compiled", result.compiled)
    if result.compile_fallback:
        trial.set_user_attr("compile_fallback", result.compile_fallback)


def quiet_lightning() -> None:
    """Keeps Lightning's per-trial start-up chatter, and warnings about choices made here
    on purpose, out of the sweep's output."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # batches are whole tensors sliced in the main process; no loader workers are wanted
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    # a machine with SLURM installed is not a SLURM job: qkv's SLURM jobs come from submitit
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system.*")
    # heartbeats are recorded by the worker loop (ask/tell), not Study.optimize
    warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
