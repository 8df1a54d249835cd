"""The sweep's settings that can be checked before anything heavy is imported or built:
``qkv sweep`` checks them, then starts its extra workers, then imports torch and Lightning."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qkvsearch.models.errors import QkvError

#: Objectives a study may optimise, with their directions.
OBJECTIVES = {
    "val_loss": "minimize",
    "val_acc": "maximize",
    "n_params": "minimize",
    "flops_per_token": "minimize",
    "latency_ms": "minimize",
}
#: Objectives measured by training; the first objective must be one of them.
TRAINED = ("val_loss", "val_acc")
#: A study name: letters, digits and ``. _ - = , +``; no separators, no ``..``.
STUDY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=,+-]{0,119}")


def sign_of(objective: str) -> float:
    """+1 for an objective to minimise, -1 for one to maximise: ``sign * value`` is lower when better."""
    return 1.0 if OBJECTIVES[objective] == "minimize" else -1.0


def check_study_name(name: Any) -> str:
    """Returns ``name`` when it is a plain name that stays inside the folders it names.

    Raises:
        QkvError: a number, a path, ``..`` or characters outside ``[A-Za-z0-9_.=,+-]``.
    """
    if not isinstance(name, str):
        raise QkvError(
            f"study_name: {name!r} is a {type(name).__name__}, not a name (Hydra reads a bare number as a number); "
            f"start it with a letter, e.g. study_name=run{name}"
        )
    if not STUDY_NAME.fullmatch(name) or ".." in name:
        raise QkvError(
            f"study_name: {name!r} is not a plain name; use up to 120 letters, digits and '. _ - = , +', "
            "starting with a letter, digit or '_' (no '/', no '..', not an absolute path)"
        )
    return name


def check_one_source(arch: Any, study_name: Any) -> None:
    """For ``qkv train``: exactly one of an architecture file and a study to take a trial from.

    Raises:
        QkvError: neither or both given.
    """
    if (arch is None) == (study_name is None):
        raise QkvError("give exactly one of arch=PATH.yaml or study_name=NAME (with trial=N or the best trial)")


def check_objectives(objectives: list[str]) -> list[str]:
    """Returns the directions of ``objectives``; raises QkvError naming a bad entry."""
    if not objectives:
        raise QkvError(f"objectives: give at least one of {', '.join(OBJECTIVES)}")
    for name in objectives:
        if name not in OBJECTIVES:
            raise QkvError(f"objectives: unknown {name!r}; valid: {', '.join(OBJECTIVES)}")
    if objectives[0] not in TRAINED:
        raise QkvError(f"objectives: the first objective must be trained ({', '.join(TRAINED)}), got {objectives[0]!r}")
    if len(set(objectives)) != len(objectives):
        raise QkvError(f"objectives: {objectives} lists an objective twice")
    return [OBJECTIVES[name] for name in objectives]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The ``trainer`` config group, as a trial's loop reads it (Trainer argument names)."""

    max_steps: int
    val_check_interval: int
    limit_val_batches: int | float = 1.0
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 50
    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    precision: str | int = "32-true"
    strategy: str = "auto"

    @property
    def world_size(self) -> int:
        """Processes that train one trial together (``devices``)."""
        return self.devices if isinstance(self.devices, int) else 1

    @classmethod
    def from_config(cls, trainer: dict[str, Any]) -> LoopSettings:
        """Reads the ``trainer`` group; raises QkvError naming every unknown or bad field."""
        fields = {f.name for f in dataclasses.fields(cls)}
        problems = [f"trainer.{key}: not a setting of a sweep trial; valid: {', '.join(sorted(fields))}"
                    for key in trainer if key not in fields]
        if not problems:
            settings = cls(**trainer)
            problems = settings.problems()
        if problems:
            raise QkvError("; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        found = []
        for name in ("max_steps", "val_check_interval", "log_every_n_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                found.append(f"trainer.{name} must be an integer >= 1, got {value!r}")
        if not found and self.max_steps < self.val_check_interval:
            found.append(f"trainer.max_steps ({self.max_steps}) is below trainer.val_check_interval "
                         f"({self.val_check_interval}): no trial would ever validate; lower val_check_interval")
        limit = self.limit_val_batches
        if isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0 or (isinstance(limit, float) and limit > 1):
            found.append(f"trainer.limit_val_batches must be a batch count >= 1 or a fraction in (0, 1], got {limit!r}")
        clip = self.gradient_clip_val
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip <= 0):
            found.append(f"trainer.gradient_clip_val must be null or a number > 0, got {clip!r}")
        devices = self.devices
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            found.append(f"trainer.devices must be an integer >= 1 in a sweep trial (each trial's processes), got {devices!r}")
        elif devices > 1 and self.strategy not in ("ddp", "auto"):
            found.append(f"trainer.strategy must be ddp (or auto) for a trial on devices={devices}, got {self.strategy!r}")
        return found


def threads_per_worker(cfg: DictConfig) -> int:
    """Intra-op threads for this worker: ``threads``, or the cores shared out when null."""
    return int(cfg.threads) if cfg.threads is not None else max(1, (os.cpu_count() or 1) // cfg.workers)


def check_sweep(cfg: DictConfig) -> list[str]:
    """Checks the sweep's own settings before anything is built; returns the directions."""
    directions = check_objectives(list(cfg.objectives))
    check_study_name(cfg.study_name)
    for key, least in (("n_trials", 1), ("workers", 1), ("max_retries", 0), ("finalists", 0), ("finalist_seeds", 1),
                       ("warm_start_k", 1)):
        if not isinstance(cfg[key], int) or cfg[key] < least:
            raise QkvError(f"{key} must be an integer >= {least}, got {cfg[key]!r}")
    if not isinstance(cfg.baseline, bool):
        raise QkvError(f"baseline must be true or false, got {cfg.baseline!r}")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise QkvError(f"threads must be null (share the cores) or an integer >= 1, got {cfg.threads!r}")
    if cfg.worker_index is not None and (not isinstance(cfg.worker_index, int) or cfg.worker_index < 0):
        raise QkvError(f"worker_index must be null or an integer >= 0, got {cfg.worker_index!r}")
    limit = cfg.memory_limit_gb
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0):
        raise QkvError(f"memory_limit_gb must be null (the device's free memory) or a number > 0, got {limit!r}")
    modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if cfg.get("compile_mode") not in modes:
        raise QkvError(f"compile_mode must be one of {', '.join(str(m).lower() if m is None else m for m in modes)}; "
                       f"got {cfg.compile_mode!r}")
    LoopSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True))
    return directions


