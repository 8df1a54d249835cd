"""The sweep's first stage: task, space, storage, study and sampler, all checked before any
trial runs; and the task a study recorded, rebuilt for the commands that read it later."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
import uuid
from typing import Any

import hydra
import optuna
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.configs import job_overrides
from qkvsearch.search.base.keys import (
    CODE_VERSION,
    OBJECTIVES,
    OVERRIDES,
    RUN_SUBDIR,
    SPACE,
    TASK,
    TASK_CONFIG,
    UID,
    WARM_STARTED_FROM,
)
from qkvsearch.search.base.settings import LoopSettings, check_sweep
from qkvsearch.search.base.version import code_version
from qkvsearch.search.inspect.artifacts import open_store, study_run_dir
from qkvsearch.search.study.progress import SweepView
from qkvsearch.search.study.storage import create_or_load_study, load_named_study, open_resilient, slot_lock
from qkvsearch.search.study.warm import warm_start
from qkvsearch.search.study.workers import RetryLost, join_study, reap_stale
from qkvsearch.search.trial.backend import FabricBackend, RankSource, TrialSettings
from qkvsearch.search.trial.duplicates import Waits
from qkvsearch.search.trial.objective import Objective, suggest_checked
from qkvsearch.spaces import FunctionSpace, Infeasible, Lacking, Space, ValuesTrial, load_space
from qkvsearch.tasks.base import TaskSizes, check_task


@dataclasses.dataclass
class Worker:
    """One process's part in a study: the study and its storage, this process's index in
    it (which seeds its sampler), and the objective it runs trials with."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    storage_cfg: Any  # the ``storage`` config group: its locks and heartbeat settings
    retry: RetryLost
    objective: Objective
    index: int
    view: SweepView  # what the terminal shows while trials run


@dataclasses.dataclass
class Prepared:
    """What :func:`prepare` built: the task and space, the study's run folder, this worker."""

    task: Any
    space: Space | FunctionSpace
    run_dir: pathlib.Path
    worker: Worker
    reference: dict[str, Any]  # the space's reference configuration, as Optuna parameters (the baseline)


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


def task_view(cfg: DictConfig, sizes: TaskSizes) -> DictConfig:
    """``cfg`` with the task's sizes under ``task`` (what spaces interpolate, as in
    ``${task.vocab_size}``), leaving ``cfg`` itself as composed."""
    root = OmegaConf.to_container(cfg, resolve=False)
    root["task"] = {**root["task"], **dataclasses.asdict(sizes)}
    return OmegaConf.create(root)


def task_of_study(study: optuna.Study) -> Any:
    """Builds the task a study was trained on, from the task config it recorded (studies
    made before that record are rebuilt from their task's name and the defaults).

    Raises:
        QkvError: the study records no task at all.
    """
    from qkvsearch.search.base.configs import compose_config

    recorded = study.user_attrs.get(TASK_CONFIG)
    if recorded is not None:
        return build_task(OmegaConf.create({"task": recorded}))
    name = study.user_attrs.get(TASK)
    if name is None:
        raise QkvError(f"study {study.study_name!r} records no task; train it with `qkv train task=...`")
    return build_task(compose_config("sweep", [f"task={name}"]))


def build_space(cfg: DictConfig, task: Any) -> Space | FunctionSpace:
    """Loads the space with the task's sizes filled in; raises SpaceError when malformed."""
    return space_for(cfg, check_task(task, str(cfg.task.get("name"))))


def space_for(cfg: DictConfig, sizes: TaskSizes) -> Space | FunctionSpace:
    """The space of ``cfg`` for a task of these sizes (a replay has the sizes, not the task)."""
    view = task_view(cfg, sizes)
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
    try:
        return instantiate(cfg.sampler, **extra)
    except InstantiationException as error:  # the sampler's own reason, not Hydra's wrapping of it
        cause = error.__cause__
        if isinstance(cause, QkvError):
            raise cause from None
        raise QkvError(f"sampler ({cfg.sampler._target_}): {cause or error}") from None


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


def check_reference(space: Any, task: Any) -> dict[str, Any]:
    """The reference's parameters, checked as a sampled trial is (before any trial runs).

    Raises:
        QkvError: the reference lacks a parameter its values make the space sample, or does
            not fit the task.
    """
    params = space.reference_params() if hasattr(space, "reference_params") else {}
    if not params:
        return {}
    try:
        suggest_checked(space, task, ValuesTrial(params))
    except Lacking as missing:
        raise QkvError(f"space {space.name!r}: reference lacks {missing.args[0]!r}, which its values make the space "
                       "sample; give it a value") from None
    except Infeasible as error:
        raise QkvError(f"space {space.name!r}: the reference configuration does not fit this task: {error}") from None
    return params


def describe_study(study: optuna.Study, cfg: DictConfig, space_name: str) -> None:
    """Records, once, what the study is (under the slot lock): its identity and run
    folder, the composed task config every later command rebuilds the task from, the
    space, objectives and code version. A later run must compose the same task.

    Raises:
        QkvError: the study was made with another task config.
    """
    task_config = OmegaConf.to_container(cfg.task, resolve=True)
    attrs = study.user_attrs
    if UID in attrs:
        recorded = attrs.get(TASK_CONFIG)
        if recorded is not None and recorded != task_config:
            raise QkvError(
                f"study {study.study_name!r} was made with task config {recorded}, but this run composes "
                f"{task_config}; resume it with the same task settings or choose another study_name"
            )
        return
    uid = uuid.uuid4().hex[:8]
    for key, value in {
        UID: uid, RUN_SUBDIR: f"{study.study_name}/{uid}", TASK: cfg.task.name, TASK_CONFIG: task_config,
        SPACE: space_name, OBJECTIVES: list(cfg.objectives), CODE_VERSION: code_version(),
        OVERRIDES: job_overrides(),
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


def open_study(cfg: DictConfig, space: Space | FunctionSpace, task: Any, directions: list[str],
               retry: RetryLost) -> tuple[optuna.Study, optuna.storages.BaseStorage, int]:
    """Creates or loads the study under the slot lock (one process creates it; the others
    load it), records what it is, joins it, and queues the warm start once."""
    storage = open_resilient(cfg.storage)
    with slot_lock(cfg.storage, cfg.study_name):
        study = create_or_load_study(storage, cfg.study_name, directions, optuna.samplers.RandomSampler(),
                                     instantiate(cfg.pruner))
        describe_study(study, cfg, space.name)
        index = join_study(study, cfg.worker_index)
        if cfg.warm_start and WARM_STARTED_FROM not in study.user_attrs and not study.get_trials(deepcopy=False):
            record = warm_start(study, warm_source(cfg), cfg.warm_start_k, space, task)
            skipped = "; ".join(f"trial {n}: {why}" for n, why in record["skipped"].items())
            print(f"warm start: trials {record['queued']} of study {cfg.warm_start!r} run first"
                  + (f"; not queued: {skipped}" if skipped else ""), flush=True)
    return study, storage, index


def prepare(cfg: DictConfig) -> Prepared:
    """Checks the whole config and opens the study; no trial has run when it returns."""
    directions = check_sweep(cfg)
    task = build_task(cfg)
    space = build_space(cfg, task)
    dry_sample(space, task)
    reference = check_reference(space, task) if cfg.baseline else {}
    retry = RetryLost(cfg.max_retries)
    study, storage, index = open_study(cfg, space, task, directions, retry)
    study.sampler = build_sampler(cfg, space, index)
    study.set_metric_names(list(cfg.objectives))  # named axes in optuna-dashboard
    run_dir = study_run_dir(study, cfg.run_root)
    view = SweepView(study, cfg.n_trials)
    settings = TrialSettings(
        loop=LoopSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True)),
        optim=OmegaConf.to_container(cfg.optim, resolve=True), seed=cfg.seed,
        compile_backend=cfg.compile_backend if cfg.compile else None,
        compile_mode=cfg.get("compile_mode") if cfg.compile else None,
        memory_limit_gb=cfg.memory_limit_gb, peak_tflops=cfg.peak_tflops,
    )
    backend = FabricBackend(
        task=task, objectives=list(cfg.objectives), settings=settings, run_dir=run_dir,
        store=open_store(cfg.artifacts) if cfg.artifacts else None,
        ranks=RankSource(OmegaConf.to_container(cfg.task.data, resolve=True), list(cfg.get("plugins") or [])),
        callbacks=lambda trial: [view.callback(trial.number)],
    )
    objective = Objective(space=space, task=task, backend=backend, prune=len(directions) == 1,
                          waits=Waits(float(cfg.storage.heartbeat_s), functools.partial(reap_stale, study, storage, cfg.storage, retry)))
    return Prepared(task, space, run_dir, Worker(study, storage, cfg.storage, retry, objective, index, view), reference)
