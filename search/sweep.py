"""``qkv sweep``: a Hydra app that runs an Optuna study of Lightning-trained architectures."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from search.artifacts import open_store
from search.configs import run_command
from search.lit import NonFiniteLoss
from search.objective import Objective, check_objectives, quiet_lightning
from search.report_text import print_summary, progress_line
from search.storage import create_or_load_study, open_storage, slot_lock, storage_url
from spaces import FunctionSpace, Infeasible, Space, load_space

log = logging.getLogger("qkvsearch")
#: States that count towards n_trials (with the running ones, which will end in one of them).
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@dataclasses.dataclass
class Setup:
    """Everything a worker needs, checked before any trial runs."""

    cfg: DictConfig
    task: Any
    space: Space | FunctionSpace
    study: optuna.Study
    objective: Objective
    run_dir: pathlib.Path


def build_task(cfg: DictConfig) -> Any:
    """Instantiates the task and copies its contract (kind, sizes) into ``cfg.task``."""
    task = instantiate(cfg.task.data)
    task.setup("fit")  # make the data once, before any trial (errors surface here too)
    for key in ("kind", "vocab_size", "seq_len", "n_classes"):
        if not hasattr(task, key):
            raise ValueError(f"task {cfg.task.name!r}: {type(task).__name__} lacks {key!r}, part of the task contract (tasks/base.py)")
        cfg.task[key] = getattr(task, key)
    return task


def build_space(cfg: DictConfig) -> Space | FunctionSpace:
    """Loads the space with the task's values filled in; raises SpaceError when malformed."""
    data = OmegaConf.to_container(cfg.space, resolve=True)
    name = cfg.space.get("name", "space")
    return load_space(data, cfg, source=f"space {name!r}")


def dry_sample(space: Space | FunctionSpace, objective: Objective, attempts: int = 50) -> None:
    """Samples offline until one architecture passes every check; errors when none does."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    reasons: list[str] = []
    for _ in range(attempts):
        trial = study.ask()
        try:
            objective.sample(trial)
            return
        except Infeasible as error:
            reasons.append(str(error))
        finally:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    raise ValueError(
        f"space {space.name!r}: none of {attempts} random samples is feasible for this task; "
        f"reasons: {'; '.join(sorted(set(reasons))[:3])}"
    )


def build_sampler(cfg: DictConfig, space: Space | FunctionSpace) -> optuna.samplers.BaseSampler:
    """Instantiates the sampler (a grid sampler gets the space's grid). Samplers read the
    constraints each trial records with ``trial.set_constraint``."""
    target = hydra.utils.get_class(cfg.sampler._target_)
    accepted = inspect.signature(target.__init__).parameters
    extra: dict[str, Any] = {}
    if "search_space" in accepted:
        if not isinstance(space, Space):
            raise ValueError("sampler=grid needs a declarative space (a YAML space), not a Python function")
        extra["search_space"] = grid_of(space)
    if cfg.sampler.get("seed") is not None:  # workers of one study must not propose the same points
        extra["seed"] = cfg.sampler.seed + 1000 * cfg.worker_index
    return instantiate(cfg.sampler, **extra)


def grid_of(space: Space) -> dict[str, list[Any]]:
    """Every value of every parameter: categorical choices and stepped ranges."""
    grid: dict[str, list[Any]] = {}
    for param in space.params:
        d = param.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            values = list(d.choices)
        elif d.step is not None and not getattr(d, "log", False):
            n = int(round((d.high - d.low) / d.step)) + 1
            if n > 64:
                raise ValueError(f"sampler=grid: parameter {param.name!r} has {n} values; a grid needs short ranges")
            values = [d.low + i * d.step for i in range(n)]
        else:
            raise ValueError(f"sampler=grid: parameter {param.name!r} is a continuous or log range; grid needs choices or steps")
        if param.per_layer:
            depth = next(p for p in space.params if p.name == param.per_layer).distribution
            for i in range(depth.high):
                grid[param.optuna_name(i)] = values
        else:
            grid[param.name] = values
    return grid


def prepare(cfg: DictConfig) -> Setup:
    """Checks the whole config and opens the study; no trial has run when it returns."""
    directions = check_objectives(list(cfg.objectives))
    if cfg.n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {cfg.n_trials}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    task = build_task(cfg)
    space = build_space(cfg)
    run_dir = pathlib.Path(cfg.run_root) / cfg.study_name
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    objective = Objective(
        space=space, task=task, run_dir=run_dir, objectives=list(cfg.objectives), trainer_kwargs=trainer_kwargs,
        optim=OmegaConf.to_container(cfg.optim, resolve=True), prune=len(directions) == 1,
        show_progress=cfg.show_trial_progress, store=open_store(cfg.artifacts) if cfg.artifacts else None, seed=cfg.seed,
    )
    dry_sample(space, objective)
    sampler = build_sampler(cfg, space)
    pruner = instantiate(cfg.pruner)
    storage = open_storage(cfg.storage)
    study = create_or_load_study(storage, cfg.study_name, directions, sampler, pruner)
    study.set_metric_names(list(cfg.objectives))  # named axes in optuna-dashboard
    study.set_user_attr("task", cfg.task.name)
    study.set_user_attr("space", space.name)
    study.set_user_attr("objectives", list(cfg.objectives))
    study.set_user_attr("run_dir", str(run_dir.resolve()))
    return Setup(cfg, task, space, study, objective, run_dir)


def next_trial(setup: Setup) -> optuna.Trial | None:
    """Starts the next trial, or returns None when the study holds ``n_trials``."""
    with slot_lock(setup.cfg.storage, setup.cfg.study_name):
        if isinstance(setup.study._storage, optuna.storages.RDBStorage):
            optuna.storages.fail_stale_trials(setup.study)
        taken = setup.study.get_trials(deepcopy=False, states=(*FINISHED, optuna.trial.TrialState.RUNNING))
        if len(taken) >= setup.cfg.n_trials:
            return None
        return setup.study.ask()


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Records the trial's heartbeat while it runs, so a dead worker's trial is failed later."""
    storage = study._storage
    if not isinstance(storage, optuna.storages.RDBStorage) or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(storage.get_heartbeat_interval()):
            storage.record_heartbeat(trial._trial_id)

    storage.record_heartbeat(trial._trial_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trial(setup: Setup, trial: optuna.Trial) -> None:
    """Runs one trial and tells the study how it ended; only an interrupt propagates."""
    pruned, failed = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    start = time.perf_counter()
    try:
        with heartbeat(setup.study, trial):
            try:
                values = setup.objective(trial)
            finally:
                trial.set_user_attr("wall_time_s", time.perf_counter() - start)
    except optuna.TrialPruned as error:
        trial.set_user_attr("pruned_reason", trial.user_attrs.get("pruned_reason") or str(error) or "pruned")
        setup.study.tell(trial, state=pruned)
    except NonFiniteLoss as error:
        trial.set_user_attr("pruned_reason", f"non-finite loss: {error}")
        setup.study.tell(trial, state=pruned)
    except torch.OutOfMemoryError as error:
        trial.set_user_attr("pruned_reason", f"out of memory: {str(error).splitlines()[0]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        setup.study.tell(trial, state=pruned)
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); run the same command to resume")
        setup.study.tell(trial, state=failed)
        raise
    except Exception as error:  # noqa: BLE001 - any error of one trial must not stop the study
        trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}"[:2000])
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        setup.study.tell(trial, state=failed)
    else:
        setup.study.tell(trial, values)


def run_worker(setup: Setup, show_progress: bool) -> None:
    """Runs trials until the study holds ``n_trials`` finished (or running) trials."""
    from rich.live import Live

    live = Live(progress_line(setup.study, setup.cfg.n_trials), refresh_per_second=2) if show_progress else None
    with live or contextlib.nullcontext():
        while (trial := next_trial(setup)) is not None:
            run_trial(setup, trial)
            if live is not None:
                live.update(progress_line(setup.study, setup.cfg.n_trials))


def spawn_workers(cfg: DictConfig, run_dir: pathlib.Path) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    """Starts ``workers - 1`` more processes of the same command on the same study; each
    writes its output to ``run_dir/workers/worker-I.log``."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("worker_index=", "workers="))]
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    procs = []
    for index in range(1, cfg.workers):
        command = [sys.executable, "-m", "search.cli", "sweep", *overrides, f"workers={cfg.workers}", f"worker_index={index}"]
        log_path = run_dir / "workers" / f"worker-{index}.log"
        with open(log_path, "w") as output:
            procs.append((subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT), log_path))
    return procs


def next_commands(cfg: DictConfig) -> list[str]:
    """The overrides that point ``qkv dashboard`` and ``qkv export`` at this sweep's storage."""
    extra = [f"study_name={cfg.study_name}"]
    if HydraConfig.initialized():
        storage = HydraConfig.get().runtime.choices.get("storage")
        if storage and storage != "sqlite":
            extra.append(f"storage={storage}")
    if cfg.run_root != "runs":
        extra.append(f"run_root={cfg.run_root}")
    return extra


def sweep(cfg: DictConfig) -> optuna.Study:
    """Runs the sweep ``cfg`` describes and returns the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_lightning()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
    setup = prepare(cfg)
    main = cfg.worker_index == 0
    procs = spawn_workers(cfg, setup.run_dir) if main and cfg.workers > 1 else []
    if main:
        print(f"study {cfg.study_name!r} in {storage_url(cfg.storage)}; trials under {setup.run_dir}")
    try:
        run_worker(setup, show_progress=main)
    except (KeyboardInterrupt, SystemExit):
        for proc, _ in procs:
            proc.send_signal(signal.SIGINT)
        print(f"interrupted: the running trial is recorded as failed; run the same command to resume {cfg.study_name!r}", file=sys.stderr)
        raise
    for proc, log_path in procs:
        if proc.wait():
            log.error("worker exited with %s; its output is in %s", proc.returncode, log_path)
    if main:
        print_summary(setup.study, next_commands(cfg))
    return setup.study


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv sweep``."""
    started = time.perf_counter()
    run_command(sweep, cfg)
    log.info("sweep took %.1f s", time.perf_counter() - started)
