"""``qkv sweep``: a Hydra app that runs an Optuna study of Lightning-trained architectures."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
import uuid
from typing import Any

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage

from qkvsearch.models.errors import QkvError
from qkvsearch.search import signals
from qkvsearch.search.errors import Interrupted
from qkvsearch.search.inspect.artifacts import open_store, study_run_dir
from qkvsearch.search.inspect.finalists import enqueue_finalists
from qkvsearch.search.inspect.report_text import print_summary
from qkvsearch.search.study.devices import VISIBLE
from qkvsearch.search.study.group import SPAWNED_BY, WorkerGroup, start_workers
from qkvsearch.search.study.progress import SweepView, print_trial
from qkvsearch.search.study.settings import LoopSettings, check_sweep, threads_per_worker
from qkvsearch.search.study.storage import (
    create_or_load_study,
    load_named_study,
    open_storage,
    slot_lock,
    storage_url,
)
from qkvsearch.search.study.warm import WARM_ATTR, warm_start
from qkvsearch.search.study.workers import (
    RetryLost,
    frozen,
    heartbeat,
    join_study,
    next_trial,
    reap_stale,
    record_interrupted,
)
from qkvsearch.search.trial.evaluate import record_test_scores
from qkvsearch.search.trial.lit import NonFiniteLoss
from qkvsearch.search.trial.objective import Objective, quiet_lightning, suggest_checked
from qkvsearch.spaces import FunctionSpace, Infeasible, Space, load_space
from qkvsearch.tasks.base import check_task

log = logging.getLogger("qkvsearch")


@dataclasses.dataclass
class Setup:
    """Everything a worker needs, checked before any trial runs."""

    cfg: DictConfig
    task: Any
    space: Space | FunctionSpace
    study: optuna.Study
    storage: BaseStorage
    retry: RetryLost
    objective: Objective
    run_dir: pathlib.Path
    index: int  # this process's worker index in the study (seeds its sampler)
    view: SweepView  # what the terminal shows while trials run


def build_task(cfg: DictConfig) -> Any:
    """Instantiates the task, makes its data once (before any trial, so errors surface
    here) and checks it against the task contract."""
    try:
        task = instantiate(cfg.task.data)
    except hydra.errors.InstantiationException as error:
        raise QkvError(f"task {cfg.task.get('name')!r}: task.data cannot be built ({error})") from None
    task.setup("fit")
    check_task(task, str(cfg.task.get("name")))
    return task


def task_view(cfg: DictConfig, task: Any) -> DictConfig:
    """``cfg`` with the task's sizes under ``task`` (what spaces interpolate, as in
    ``${task.vocab_size}``), leaving ``cfg`` itself as composed."""
    root = OmegaConf.to_container(cfg, resolve=False)
    root["task"] = {**root["task"], **dataclasses.asdict(check_task(task, str(cfg.task.get("name"))))}
    return OmegaConf.create(root)


def task_of_study(study: optuna.Study) -> Any:
    """Builds the task a study was trained on, from the task config it recorded (studies
    made before that record are rebuilt from their task's name and the defaults).

    Raises:
        ValueError: the study records no task at all.
    """
    from qkvsearch.search.configs import compose_config

    recorded = study.user_attrs.get("task_config")
    if recorded is not None:
        return build_task(OmegaConf.create({"task": recorded}))
    name = study.user_attrs.get("task")
    if name is None:
        raise QkvError(f"study {study.study_name!r} records no task; train it with `qkv train task=...`")
    return build_task(compose_config("sweep", [f"task={name}"]))


def build_space(cfg: DictConfig, task: Any) -> Space | FunctionSpace:
    """Loads the space with the task's sizes filled in; raises SpaceError when malformed."""
    view = task_view(cfg, task)
    data = OmegaConf.to_container(view.space, resolve=True)
    name = cfg.space.get("name", "space")
    return load_space(data, view, source=f"space {name!r}")


def dry_sample(space: Space | FunctionSpace, task: Any, attempts: int = 50) -> None:
    """Samples offline until one architecture passes every check; errors when none does."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    reasons: list[str] = []
    # every choice of every categorical parameter once first: a choice naming a component
    # that is not registered is a config error now, not a silently infeasible region later
    choices = [(p.name, c) for p in getattr(space, "params", []) if p.per_layer is None
               and isinstance(p.distribution, optuna.distributions.CategoricalDistribution) for c in p.distribution.choices]
    for name, choice in choices:
        study.enqueue_trial({name: choice}, skip_if_exists=False)
    found = False
    for _ in range(len(choices) + attempts):
        if found and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            return
        trial = study.ask()
        try:
            suggest_checked(space, task, trial)
            found = True
        except Infeasible as error:
            reasons.append(str(error))
        finally:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    if found:
        return
    raise QkvError(
        f"space {space.name!r}: none of {attempts} random samples is feasible for this task; "
        f"reasons: {'; '.join(sorted(set(reasons))[:3])}"
    )


def build_sampler(cfg: DictConfig, space: Space | FunctionSpace, index: int) -> optuna.samplers.BaseSampler:
    """Instantiates the sampler (a grid sampler gets the space's grid); worker ``index``
    draws its own stream (seed + 1000 * index). Samplers read the constraints each trial
    records with ``trial.set_constraint``."""
    target = hydra.utils.get_class(cfg.sampler._target_)
    accepted = inspect.signature(target.__init__).parameters
    extra: dict[str, Any] = {}
    if "search_space" in accepted:
        if not isinstance(space, Space):
            raise QkvError("sampler=grid needs a declarative space (a YAML space), not a Python function")
        extra["search_space"] = grid_of(space)
    if cfg.sampler.get("seed") is not None:  # workers of one study must not propose the same points
        extra["seed"] = cfg.sampler.seed + 1000 * index
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
                raise QkvError(f"sampler=grid: parameter {param.name!r} has {n} values; a grid needs short ranges")
            values = [d.low + i * d.step for i in range(n)]
        else:
            raise QkvError(f"sampler=grid: parameter {param.name!r} is a continuous or log range; grid needs choices or steps")
        for name in space.optuna_names(param):
            grid[name] = values
    return grid


def code_version() -> str:
    """qkvsearch's version, and the commit when it runs from a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("qkvsearch")
    except PackageNotFoundError:
        found = "unknown"
    root = pathlib.Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0 and commit.stdout.strip():
            found += f"+g{commit.stdout.strip()}"
    return found


def describe_study(study: optuna.Study, cfg: DictConfig, space_name: str) -> None:
    """Records, once, what the study is (under the slot lock): its identity and run
    folder, the composed task config every later command rebuilds the task from, the
    space, objectives and code version. A later run must compose the same task.

    Raises:
        ValueError: the study was made with another task config.
    """
    task_config = OmegaConf.to_container(cfg.task, resolve=True)
    attrs = study.user_attrs
    if "uid" in attrs:
        recorded = attrs.get("task_config")
        if recorded is not None and recorded != task_config:
            raise QkvError(
                f"study {study.study_name!r} was made with task config {recorded}, but this run composes "
                f"{task_config}; resume it with the same task settings or choose another study_name"
            )
        return
    uid = uuid.uuid4().hex[:8]
    for key, value in {
        "uid": uid, "run_subdir": f"{study.study_name}/{uid}", "task": cfg.task.name, "task_config": task_config,
        "space": space_name, "objectives": list(cfg.objectives), "code_version": code_version(),
    }.items():
        study.set_user_attr(key, value)


def warm_source(cfg: DictConfig) -> optuna.Study:
    """The study ``warm_start`` names, in ``warm_start_storage`` or this sweep's storage."""
    if cfg.warm_start_storage is None:
        try:
            return load_named_study(cfg.storage, cfg.warm_start)
        except QkvError as error:
            raise QkvError(f"warm_start: {error}") from None
    try:
        return optuna.load_study(study_name=cfg.warm_start, storage=cfg.warm_start_storage)
    except KeyError:
        raise QkvError(f"warm_start: no study {cfg.warm_start!r} in warm_start_storage {cfg.warm_start_storage}") from None


def prepare(cfg: DictConfig) -> Setup:
    """Checks the whole config and opens the study; no trial has run when it returns."""
    directions = check_sweep(cfg)
    task = build_task(cfg)
    space = build_space(cfg, task)
    dry_sample(space, task)
    pruner = instantiate(cfg.pruner)
    retry = RetryLost(cfg.max_retries)
    storage = open_storage(cfg.storage, stale_callback=retry)
    with slot_lock(cfg.storage, cfg.study_name):  # one process creates the study; the others load it
        study = create_or_load_study(storage, cfg.study_name, directions, optuna.samplers.RandomSampler(), pruner)
        describe_study(study, cfg, space.name)
        index = join_study(study, cfg.worker_index)
        if cfg.warm_start and WARM_ATTR not in study.user_attrs and not study.get_trials(deepcopy=False):
            record = warm_start(study, warm_source(cfg), cfg.warm_start_k, space, task)
            skipped = "; ".join(f"trial {n}: {why}" for n, why in record["skipped"].items())
            print(f"warm start: trials {record['queued']} of study {cfg.warm_start!r} run first"
                  + (f"; not queued: {skipped}" if skipped else ""), flush=True)
    study.sampler = build_sampler(cfg, space, index)
    study.set_metric_names(list(cfg.objectives))  # named axes in optuna-dashboard
    run_dir = study_run_dir(study, cfg.run_root)
    view = SweepView(study, cfg.n_trials)
    objective = Objective(
        space=space, task=task, run_dir=run_dir, objectives=list(cfg.objectives),
        settings=LoopSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True)),
        optim=OmegaConf.to_container(cfg.optim, resolve=True), prune=len(directions) == 1,
        store=open_store(cfg.artifacts) if cfg.artifacts else None,
        seed=cfg.seed, poll_s=float(cfg.storage.heartbeat_s), reap=functools.partial(reap_stale, study, cfg.storage),
        callbacks=lambda trial: [view.callback(trial.number)], memory_limit_gb=cfg.memory_limit_gb,
        peak_tflops=cfg.peak_tflops, compile_backend=cfg.compile_backend if cfg.compile else None,
        task_data=OmegaConf.to_container(cfg.task.data, resolve=True), plugins=list(cfg.get("plugins") or []),
    )
    return Setup(cfg, task, space, study, storage, retry, objective, run_dir, index, view)


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None = None,
         state: optuna.trial.TrialState | None = None) -> None:
    """Tells the study a result; a trial another worker already failed (its heartbeat
    went stale, so its retry is queued) is left as it is."""
    try:
        study.tell(trial, values, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was failed by another worker while it ran (heartbeats late?); its retry runs instead",
                    trial.number)


def note(trial: optuna.Trial, key: str, value: Any) -> None:
    """Records a user attribute; nothing when another worker already failed the trial."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr(key, value)


def run_trial(setup: Setup, trial: optuna.Trial) -> None:
    """Runs one trial and tells the study how it ended; only an interrupt propagates."""
    pruned, failed = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("worker_index", setup.index)
    if VISIBLE in os.environ:
        trial.set_user_attr("cuda_visible_devices", os.environ[VISIBLE])
    if "SLURM_JOB_ID" in os.environ:  # as squeue and scancel name it (an array's task: 12_3); submitit's log folder too
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        trial.set_user_attr("slurm_job_id", "_".join(array) if all(array) else os.environ["SLURM_JOB_ID"])
    start = time.perf_counter()
    try:
        with heartbeat(setup.storage, trial):
            try:
                values = setup.objective(trial)
            finally:
                note(trial, "wall_time_s", time.perf_counter() - start)
    except optuna.TrialPruned as error:
        note(trial, "pruned_reason", trial.user_attrs.get("pruned_reason") or str(error) or "pruned")
        tell(setup.study, trial, state=pruned)
    except NonFiniteLoss as error:
        note(trial, "pruned_reason", f"non-finite loss: {error}")
        tell(setup.study, trial, state=pruned)
    except torch.OutOfMemoryError as error:
        note(trial, "pruned_reason", f"out of memory: {str(error).splitlines()[0]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tell(setup.study, trial, state=pruned)
    except (Interrupted, KeyboardInterrupt, SystemExit) as error:
        record_interrupted(setup.study, trial, str(error) or type(error).__name__, setup.retry)
        raise
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was failed by another worker while it ran; its retry runs instead", trial.number)
    except Exception as error:  # noqa: BLE001 - any error of one trial must not stop the study
        note(trial, "fail_reason", f"{type(error).__name__}: {error}"[:2000])
        note(trial, "traceback", traceback.format_exc()[-4000:])
        tell(setup.study, trial, state=failed)
    else:
        tell(setup.study, trial, values)


def run_worker(setup: Setup, live: bool, n_trials: int | None = None) -> None:
    """Runs trials until the study holds ``n_trials`` (default: the sweep's) counted trials,
    none is queued and none runs; prints a line per finished trial, and with ``live`` the
    counts and the current trial."""
    from rich.console import Console
    from rich.live import Live

    cfg = setup.cfg
    console = Console()
    view = setup.view
    objectives = list(cfg.objectives)
    with Live(view, console=console, refresh_per_second=2, transient=True) if live else contextlib.nullcontext():
        target = cfg.n_trials if n_trials is None else n_trials
        while (trial := next_trial(setup.study, setup.storage, cfg.storage, target, cfg.storage.heartbeat_s)) is not None:
            run_trial(setup, trial)
            print_trial(console, frozen(setup.study, trial.number), objectives)
            view.current = {}


def run_finalists(setup: Setup) -> None:
    """Retrains the best distinct architectures with more seeds (``finalists``,
    ``finalist_seeds``) once the study's trials are done; a single-objective study only."""
    cfg, study = setup.cfg, setup.study
    if not cfg.finalists or len(study.directions) > 1:
        return
    with slot_lock(cfg.storage, cfg.study_name):
        queued = enqueue_finalists(study, cfg.finalists, cfg.finalist_seeds)
    if queued:
        print(f"finalists: {queued} more trials retrain the {cfg.finalists} best architectures with "
              f"{cfg.finalist_seeds} more seeds each", flush=True)
    run_worker(setup, live=False, n_trials=0)  # only the queued trials: finalists (and any retry)


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


def sweep(cfg: DictConfig, group: WorkerGroup | None = None, started: bool = False) -> optuna.Study:
    """Runs the sweep ``cfg`` describes and returns the study; ``started``: the caller ran
    :func:`start_workers` already (``group`` is what it returned)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_lightning()
    spawned = SPAWNED_BY in os.environ
    try:
        # a signal stops the sweep between steps and between storage writes, never inside one
        with signals.deferred():
            if not started:
                group = start_workers(cfg)
            torch.set_num_threads(threads_per_worker(cfg))
            setup = prepare(cfg)  # checks the settings (an extra worker's too) before it builds
            main = not spawned and setup.index == 0
            if not spawned:
                print(f"study {cfg.study_name!r} in {storage_url(cfg.storage)}; trials under {setup.run_dir}", flush=True)
                if group:
                    print(f"{len(group.procs)} more workers, logs in {group.log_dir}", flush=True)
            run_worker(setup, live=main and sys.stdout.isatty())
    except (Interrupted, KeyboardInterrupt):
        if group:
            group.interrupt()
        print(f"interrupted: the running trial is failed and queued again; run the same command to resume "
              f"{cfg.study_name!r}", file=sys.stderr)
        raise
    except BaseException:
        if group:
            group.interrupt()
        raise
    if group:
        group.wait()
    if not spawned:
        try:
            with signals.deferred():
                run_finalists(setup)
        except (Interrupted, KeyboardInterrupt):
            print(f"interrupted: the running finalist is failed and queued again; run the same command to resume "
                  f"{cfg.study_name!r}", file=sys.stderr)
            raise
        record_test_scores(setup.study, setup.task, cfg.run_root)  # selected on validation, reported on test
        print_summary(setup.study, next_commands(cfg))
    return setup.study
