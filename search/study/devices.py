"""Which device each worker of a sweep trains on.

``qkv sweep workers=auto`` starts one worker per visible GPU (``trials_per_gpu`` workers
per GPU for small models), each pinned to its GPU by its own ``CUDA_VISIBLE_DEVICES``, so
Lightning, memory statistics and out-of-memory errors stay per worker. ``gpus=[2,3]``
chooses the GPUs. Without GPUs (or with ``trainer=cpu``) ``auto`` is one worker per two
cores. GPUs are counted without initialising CUDA in this process (from
``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``), so the first worker can still pin itself.

``trials_per_gpu=auto`` packs as many workers on each GPU as fit: the space's largest
trial (the most a training step of any of 200 random feasible samples needs, counted from
the architecture by :func:`~qkvsearch.search.trial.hardware.estimate_memory`) plus a
worker's own overhead (its CUDA context, cuBLAS workspaces and the caching allocator's
slack, :data:`WORKER_OVERHEAD`), into 90% of the emptiest chosen GPU's free memory as
``nvidia-smi`` reads it, at most :data:`MAX_TRIALS_PER_GPU`. A number the GPUs cannot
hold that way is refused before anything starts, so co-located workers never run each
other out of memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.env import VISIBLE


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    if VISIBLE in os.environ:
        return [g.strip() for g in os.environ[VISIBLE].split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if listing.returncode == 0:
            return [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]
    return []


GiB = 2**30
#: what one more process on a GPU takes beside its trial: a CUDA context (300-500 MB on
#: recent GPUs), cuBLAS/cuDNN workspaces and the caching allocator's fragmentation
WORKER_OVERHEAD = 1 * GiB
#: the most workers ``trials_per_gpu=auto`` puts on one GPU: past this the GPU's time, not
#: its memory, is what they share (benchmarks/gpu.py measures trials per hour against k)
MAX_TRIALS_PER_GPU = 16
#: the share of a GPU's free memory the packed workers may plan to use
USABLE = 0.9


def gpu_free_memory(gpus: list[str]) -> dict[str, int] | None:
    """Free bytes of each GPU (by ``CUDA_VISIBLE_DEVICES`` name), read with ``nvidia-smi``
    so this process does not initialise CUDA; None where it cannot say."""
    if shutil.which("nvidia-smi") is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20)
        if listing.returncode == 0:
            free: dict[str, int] = {}
            for line in listing.stdout.strip().splitlines():
                index, uuid, mib = (part.strip() for part in line.split(","))
                free[index] = free[uuid] = int(float(mib)) * 2**20
            return {gpu: free[gpu] for gpu in gpus} if all(gpu in free for gpu in gpus) else None
    return None


def trials_that_fit(largest: int, free: int) -> int:
    """How many workers, each running a trial of ``largest`` bytes, ``free`` bytes hold."""
    return max(0, min(MAX_TRIALS_PER_GPU, int(USABLE * free) // (largest + WORKER_OVERHEAD)))


def largest_trial_memory(cfg: Any, samples: int = 200) -> int | None:
    """The most memory a training step of the sweep's space needs, over ``samples`` random
    feasible samples (None: the task has no fixed batch size to count with)."""
    from qkvsearch.search.study.prepare import build_space, build_task
    from qkvsearch.search.trial.hardware import estimate_memory
    from qkvsearch.search.trial.objective import random_draws
    from qkvsearch.spaces import Infeasible

    task = build_task(cfg)
    batch_size = getattr(task, "batch_size", None)
    if not isinstance(batch_size, int):
        return None
    precision = cfg.trainer.get("precision", "32-true")
    most = 0
    for draw in random_draws(build_space(cfg, task), task, samples, int(cfg.seed)):
        if not isinstance(draw, Infeasible):
            most = max(most, estimate_memory(draw, batch_size, task.seq_len, precision).total)
    return most or None


def _per_gpu(cfg: Any, per_gpu: Any, chosen: list[str], largest: Callable[[], int | None]) -> int:
    """``trials_per_gpu`` resolved (``auto``) and checked against the GPUs' free memory."""
    if per_gpu == 1:
        return 1
    free = gpu_free_memory(chosen)
    need = largest() if free is not None else None
    if need is None:  # nothing to measure with: auto is one worker per GPU, a number is taken as given
        return 1 if per_gpu == "auto" else per_gpu
    emptiest = min(chosen, key=lambda gpu: free[gpu])
    fit = max(trials_that_fit(need, free[emptiest]), 1)  # not even one: each trial's own preflight prunes it
    if per_gpu == "auto":
        return fit
    if per_gpu > fit:
        raise QkvError(
            f"trials_per_gpu={per_gpu} does not fit: the space's largest trial needs ~{need / GiB:.2f} GiB and a "
            f"worker ~{WORKER_OVERHEAD / GiB:.0f} GiB more, and GPU {emptiest} has {free[emptiest] / GiB:.1f} GiB "
            f"free ({USABLE:.0%} usable): at most {fit} per GPU (or trials_per_gpu=auto)")
    return per_gpu


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """How many workers, and each worker's ``CUDA_VISIBLE_DEVICES`` (None: inherit)."""

    workers: int
    devices: list[str | None]


def plan_workers(cfg: Any, largest: Callable[[], int | None] | None = None) -> WorkerPlan:
    """Resolves ``workers`` (an int or ``auto``), ``gpus`` and ``trials_per_gpu`` (an int or
    ``auto``); ``largest`` gives the space's largest trial's bytes (by default sampled, and
    only when GPUs are packed).

    Raises:
        QkvError: a bad value, or more workers than GPU slots, naming the fields.
    """
    workers, gpus, per_gpu = cfg.workers, cfg.get("gpus"), cfg.get("trials_per_gpu", 1)
    if per_gpu != "auto" and (not isinstance(per_gpu, int) or isinstance(per_gpu, bool) or per_gpu < 1):
        raise QkvError(f"trials_per_gpu must be an integer >= 1 or 'auto', got {per_gpu!r}")
    if gpus is not None and (not all(isinstance(g, int) and g >= 0 for g in gpus) or len(set(gpus)) != len(gpus)):
        raise QkvError(f"gpus must be null (every visible GPU) or a list of distinct GPU indices, got {list(gpus)!r}")
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise QkvError(f"workers must be an integer >= 1 or 'auto', got {workers!r}")
    on_cpu = cfg.trainer.get("accelerator") == "cpu"
    chosen = [str(g) for g in gpus] if gpus is not None else ([] if on_cpu else visible_gpus())
    per_trial = cfg.trainer.get("devices", 1)
    per_trial = per_trial if isinstance(per_trial, int) and not isinstance(per_trial, bool) else 1
    if not chosen:
        count = max(1, (os.cpu_count() or 1) // (2 * per_trial)) if workers == "auto" else workers
        return WorkerPlan(count, [None] * count)
    if per_trial > 1:  # a multi-device trial: each worker owns trainer.devices GPUs of its own
        if per_gpu == "auto" or per_gpu > 1:
            raise QkvError(f"trials_per_gpu={per_gpu} packs single-GPU trials; with trainer.devices={per_trial} keep it 1")
        slots = len(chosen) // per_trial
        count = max(slots, 1) if workers == "auto" else workers
        if count > slots:
            raise QkvError(f"workers={workers} with trainer.devices={per_trial} needs {count * per_trial} GPUs; "
                           f"gpus={chosen} has {len(chosen)} (lower workers or trainer.devices, or add gpus)")
        return WorkerPlan(count, [",".join(chosen[i * per_trial:(i + 1) * per_trial]) for i in range(count)])
    per_gpu = _per_gpu(cfg, per_gpu, chosen, largest or (lambda: largest_trial_memory(cfg)))
    slots = len(chosen) * per_gpu
    count = slots if workers == "auto" else workers
    if count > slots:
        raise QkvError(f"workers={count} needs {count} GPU slots; gpus={chosen} x trials_per_gpu={per_gpu} gives {slots} "
                       "(raise trials_per_gpu, add gpus, or lower workers)")
    return WorkerPlan(count, [chosen[i // per_gpu] for i in range(count)])
