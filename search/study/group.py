"""The extra worker processes of ``qkv sweep workers=N``, started and supervised by the first.

Each extra worker runs the same command line (Hydra's own flags such as ``--config-dir``
included) in a session of its own, so a terminal's Ctrl-C reaches only the first process,
which forwards exactly one SIGINT to each. A worker asks the kernel to send it SIGTERM
when the first process dies (``PR_SET_PDEATHSIG``), so none outlives it unsupervised: its
running trial is recorded as interrupted and queued again. A worker that exits with an
error is reported at once, with the end of its log, and fails the sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import threading
from typing import Any

from qkvsearch.search.base.env import CONFIG_FLAGS, SPAWNED_BY, VISIBLE, tail


def worker_command(argv: list[str], job_overrides: list[str], workers: int) -> list[str]:
    """The command line of an extra worker: Hydra's flags from ``argv`` and this job's
    overrides (never ``-m``: a multirun job's workers run that one job)."""
    flags: list[str] = []
    for i, arg in enumerate(argv):
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            flags += [arg, argv[i + 1]]
        elif arg.startswith(tuple(f"{flag}=" for flag in CONFIG_FLAGS)):
            flags.append(arg)
    overrides = [o for o in job_overrides if not o.startswith(("worker_index=", "workers="))]
    return [sys.executable, "-m", "qkvsearch.search.cli", "sweep", *flags, *overrides, f"workers={workers}"]


@dataclasses.dataclass
class WorkerGroup:
    """The extra workers of one sweep and their logs."""

    procs: list[subprocess.Popen]
    logs: list[pathlib.Path]
    log_dir: pathlib.Path
    failed: list[str] = dataclasses.field(default_factory=list)
    stopping: bool = False

    @classmethod
    def start(cls, cfg: Any, devices: list[str | None] | None = None) -> WorkerGroup:
        """Starts ``cfg.workers - 1`` processes of this command on the same study at once,
        before this process builds anything, so all start together; worker ``i`` gets
        ``CUDA_VISIBLE_DEVICES=devices[i]`` where that is not None."""
        from hydra.core.hydra_config import HydraConfig

        from qkvsearch.models.errors import QkvError

        if not HydraConfig.initialized():
            raise QkvError("workers > 1 starts processes of the qkv command line; run `qkv sweep workers=N`")
        command = worker_command(sys.argv[1:], list(HydraConfig.get().overrides.task), cfg.workers)
        log_dir = pathlib.Path(cfg.run_root) / "workers" / cfg.study_name
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, SPAWNED_BY: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        procs, logs = [], []
        for index in range(1, cfg.workers):
            log_path = log_dir / f"worker-{index}.log"
            device = devices[index] if devices else None
            own_env = env if device is None else {**env, VISIBLE: device}
            with open(log_path, "w") as output:
                procs.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=own_env, start_new_session=True))
            logs.append(log_path)
        group = cls(procs, logs, log_dir)
        threading.Thread(target=group._watch, daemon=True, name="worker-watch").start()
        return group

    def _watch(self) -> None:
        """Reports a worker that exits with an error as soon as it does."""
        pending = dict(zip(self.procs, self.logs, strict=True))
        while pending:
            for proc, log_path in list(pending.items()):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
                if proc.returncode is None:
                    continue
                del pending[proc]
                if proc.returncode != 0 and not self.stopping:
                    self._report(proc, log_path)

    def _report(self, proc: subprocess.Popen, log_path: pathlib.Path) -> None:
        message = f"worker pid {proc.pid} exited with status {proc.returncode}; the end of {log_path}:\n{tail(log_path)}"
        if message not in self.failed:
            self.failed.append(message)
            print(f"qkv: error: {message}", file=sys.stderr, flush=True)

    def interrupt(self, timeout_s: float = 120.0) -> None:
        """Sends each worker one SIGINT and waits for them to record their trials."""
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()

    def wait(self) -> None:
        """Waits for every worker; raises SystemExit(1) when any exited with an error."""
        for proc, log_path in zip(self.procs, self.logs, strict=True):
            if proc.wait() != 0:
                self._report(proc, log_path)
        if self.failed:
            print(f"qkv: error: {len(self.failed)} of {len(self.procs) + 1} workers failed; see above", file=sys.stderr)
            raise SystemExit(1)


def start_workers(cfg: Any) -> WorkerGroup | None:
    """In the first process: resolves ``workers``/``gpus``, pins this process to its GPU,
    checks the settings and starts the extra workers (each pinned to its own). Nothing in
    an extra worker. (Imported here, not at the top: the CLI imports this module for every
    command, and the settings' modules import torch.)"""
    from qkvsearch.search.base.settings import check_sweep
    from qkvsearch.search.study.devices import plan_workers

    if SPAWNED_BY in os.environ:
        return None
    plan = plan_workers(cfg)
    cfg.workers = plan.workers
    if plan.devices[0] is not None:  # before anything initialises CUDA in this process
        os.environ[VISIBLE] = plan.devices[0]
    check_sweep(cfg)
    return WorkerGroup.start(cfg, plan.devices) if plan.workers > 1 else None
