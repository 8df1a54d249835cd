"""Which device each worker of a sweep trains on.

``qkv sweep workers=auto`` starts one worker per visible GPU (``trials_per_gpu`` workers
per GPU for small models), each pinned to its GPU by its own ``CUDA_VISIBLE_DEVICES``, so
Lightning, memory statistics and out-of-memory errors stay per worker. ``gpus=[2,3]``
chooses the GPUs. Without GPUs (or with ``trainer=cpu``) ``auto`` is one worker per two
cores. GPUs are counted without initialising CUDA in this process (from
``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``), so the first worker can still pin itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
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


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """How many workers, and each worker's ``CUDA_VISIBLE_DEVICES`` (None: inherit)."""

    workers: int
    devices: list[str | None]


def plan_workers(cfg: Any) -> WorkerPlan:
    """Resolves ``workers`` (an int or ``auto``), ``gpus`` and ``trials_per_gpu``.

    Raises:
        QkvError: a bad value, or more workers than GPU slots, naming the fields.
    """
    workers, gpus, per_gpu = cfg.workers, cfg.get("gpus"), cfg.get("trials_per_gpu", 1)
    if not isinstance(per_gpu, int) or isinstance(per_gpu, bool) or per_gpu < 1:
        raise QkvError(f"trials_per_gpu must be an integer >= 1, got {per_gpu!r}")
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
        if per_gpu > 1:
            raise QkvError(f"trials_per_gpu={per_gpu} packs single-GPU trials; with trainer.devices={per_trial} keep it 1")
        slots = len(chosen) // per_trial
        count = max(slots, 1) if workers == "auto" else workers
        if count > slots:
            raise QkvError(f"workers={workers} with trainer.devices={per_trial} needs {count * per_trial} GPUs; "
                           f"gpus={chosen} has {len(chosen)} (lower workers or trainer.devices, or add gpus)")
        return WorkerPlan(count, [",".join(chosen[i * per_trial:(i + 1) * per_trial]) for i in range(count)])
    slots = len(chosen) * per_gpu
    count = slots if workers == "auto" else workers
    if count > slots:
        raise QkvError(f"workers={count} needs {count} GPU slots; gpus={chosen} x trials_per_gpu={per_gpu} gives {slots} "
                       "(raise trials_per_gpu, add gpus, or lower workers)")
    return WorkerPlan(count, [chosen[i // per_gpu] for i in range(count)])
