"""Multi-device trials: ``trainer.devices=N trainer.strategy=ddp``.

For each such trial the worker is rank 0 and starts N - 1 helper processes
(``python -m qkvsearch.search.trial.ranks SPEC``). All N join one process group on a fresh
port of 127.0.0.1 (gloo on CPUs, NCCL on GPUs; Lightning's DDP over Fabric), and each
trains the same architecture from the same seed on every N-th batch, DDP averaging the
gradients, so a step sees N batches. Only rank 0 talks to Optuna: it asks, reports, tells,
saves the weights and the artifacts. The ranks agree at each validation: rank 0's pruning
decision, and whether any rank's loss went non-finite, are shared, so every rank stops at
the same step (``search/trial/loop.py``).

A helper that fails exits; its peers' next collective then fails (gloo notices at once,
NCCL when the group's timeout passes), so rank 0's trial fails with the helper's error
and the study goes on. Whatever ends the trial, rank 0 ends every helper before the next
one (terminate, then kill): none is left behind. Helpers run in sessions of their own, so
the terminal's Ctrl-C reaches only rank 0, and they die with it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from qkvsearch.search.base.env import tail

#: what torch.distributed and Lightning read to join a group that was started from outside
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK")


#: how long a rank waits in a collective for the others (a first step that compiles can
#: take minutes); after it, a rank whose peer died (NCCL does not notice sooner; gloo does)
#: fails the trial
DDP_TIMEOUT = datetime.timedelta(minutes=10)


class RankFailed(RuntimeError):
    """A helper rank of a multi-device trial failed."""


def _failed(procs: list[tuple[int, subprocess.Popen, pathlib.Path]], wait_s: float) -> RankFailed | None:
    """The first helper that exited with an error (waiting up to ``wait_s`` for each)."""
    for rank, proc, log in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
        if proc.returncode not in (None, 0):
            return RankFailed(f"rank {rank} exited with status {proc.returncode}; its log ({log}) ends:\n{tail(log, 15)}")
    return None


def backend(settings: Any) -> str:
    """NCCL where the trial trains on GPUs, gloo on CPUs."""
    import torch

    return "nccl" if settings.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "gloo"


def join(store: Any, rank: int, world: int, settings: Any) -> None:
    """Joins the trial's process group through ``store`` (Lightning then finds it made)."""
    import torch
    import torch.distributed as dist

    if backend(settings) == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend(settings), store=store, rank=rank, world_size=world, timeout=DDP_TIMEOUT)


@contextlib.contextmanager
def helper_ranks(world: int, spec: dict[str, Any], folder: pathlib.Path) -> Iterator[None]:
    """Starts ranks 1 .. world-1 of a trial (``spec``: what :func:`main` reads), makes this
    process rank 0 for the block, and afterwards checks and ends them."""
    import torch.distributed as dist

    from qkvsearch.search.base import signals
    from qkvsearch.search.base.env import SPAWNED_BY
    from qkvsearch.search.base.settings import LoopSettings

    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    # the group's meeting point, on a port the system picks; rank 0 holds it
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=DDP_TIMEOUT, wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(world), "NODE_RANK": "0"}
    saved = {key: os.environ.get(key) for key in DIST_ENV}
    procs: list[tuple[int, subprocess.Popen, pathlib.Path]] = []
    try:
        for rank in range(1, world):
            log = folder / f"rank{rank}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "qkvsearch.search.trial.ranks", str(spec_path)],
                                        env={**os.environ, **env, "LOCAL_RANK": str(rank), "RANK": str(rank),
                                             SPAWNED_BY: str(os.getpid())},
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append((rank, proc, log))
        os.environ.update(env, LOCAL_RANK="0", RANK="0")
        for rank, proc, log in procs:  # each helper checks in; one that dies first fails the trial now
            while not store.check([f"ready{rank}"]):
                if proc.poll() is not None:
                    raise RankFailed(f"rank {rank} exited with status {proc.returncode} before it joined; "
                                     f"its log ({log}) ends:\n{tail(log, 15)}")
                signals.pause(0.05)
        join(store, 0, world, LoopSettings(**spec["settings"]))
        try:
            yield
        except Exception as error:
            helper = _failed(procs, wait_s=5.0)
            if helper is not None and not isinstance(error, RankFailed):
                raise helper from error  # the cause, not the broken connection rank 0 saw
            raise
        helper = _failed(procs, wait_s=60.0)
        if helper is not None:
            raise helper
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> None:
    """A helper rank: builds the trial's task and model as rank 0 did and trains with it."""
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the trial stops
    from qkvsearch.search.base.env import die_with_parent

    die_with_parent()
    spec = json.loads(pathlib.Path(argv[0]).read_text())
    import lightning as L
    import optuna
    import torch
    import torch.distributed as dist
    from hydra.utils import instantiate

    from qkvsearch.models import ArchConfig
    from qkvsearch.search.base.configs import import_plugins
    from qkvsearch.search.base.settings import LoopSettings
    from qkvsearch.search.trial.lit import LitTransformer, NonFiniteLoss, quiet_lightning
    from qkvsearch.search.trial.loop import fit

    quiet_lightning()
    import_plugins(spec.get("plugins"))
    torch.set_num_threads(spec["threads"])
    task = instantiate(spec["task_data"])
    task.setup("fit")
    settings = LoopSettings(**spec["settings"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=DDP_TIMEOUT)
    store.set(f"ready{rank}", "1")
    join(store, rank, world, settings)
    L.seed_everything(spec["seed"], verbose=False)
    lit = LitTransformer(ArchConfig.from_dict(spec["arch"]), task.kind, **spec["optim"])
    try:  # how it ended goes to ranks/rank<N>.json; rank 0 records the trial
        result = fit(lit, task, settings, [], None, spec["compile_backend"], spec.get("compile_mode"))
        outcome = {"outcome": "complete", "metrics": result.metrics, "device": result.device}
    except (optuna.TrialPruned, NonFiniteLoss) as error:  # a decision every rank took at the same step
        outcome = {"outcome": "pruned", "reason": str(error)}
    pathlib.Path(argv[0]).with_name(f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
