"""Every config group composes and instantiates; bad input fails before any trial."""

from __future__ import annotations

import math
import pathlib
import sysconfig

import lightning as L
import optuna
import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qkvsearch.search.base.settings import LoopSettings, check_objectives
from qkvsearch.search.commands.train import train
from qkvsearch.search.study.prepare import build_sampler, build_space, build_task
from qkvsearch.search.study.storage import StorageError, open_storage
from qkvsearch.search.study.sweep import sweep
from qkvsearch.search.trial.lit import check_compatible
from tests.conftest import CONF, compose_conf, tiny_sweep_conf


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (pathlib.Path(CONF) / group).glob("*.yaml"))


TASK_FOR_SPACE = {"tiny": "lm_stdlib", "bench": "lm_stdlib", "decoder": "recall", "encoder": "digits", "encoder_decoder": "reverse"}


@pytest.mark.parametrize("space", _options("space"))
def test_every_space_composes_with_its_task_and_every_sampler_instantiates(space):
    cfg = compose_conf("sweep", [f"space={space}", f"task={TASK_FOR_SPACE[space]}"])
    task = build_task(cfg)
    built = build_space(cfg, task)
    assert built.name == space
    for sampler in _options("sampler"):
        cfg_s = compose_conf("sweep", [f"space={space}", f"task={TASK_FOR_SPACE[space]}", f"sampler={sampler}"])
        build_task(cfg_s)
        try:
            assert isinstance(build_sampler(cfg_s, built, 0), optuna.samplers.BaseSampler)
        except ValueError as error:  # only a grid refuses, and only spaces with log ranges
            assert sampler == "grid" and "is a continuous or log range" in str(error)
            assert any(getattr(p.distribution, "log", False) for p in built.params)
    assert task.kind in ("language_model", "classification", "seq2seq")


def test_the_grid_sampler_enumerates_choices_steps_and_per_layer_parameters():
    from qkvsearch.search.study.prepare import grid_of
    from qkvsearch.spaces import load_space

    space = load_space({
        "params": {"depth": {"type": "int", "low": 1, "high": 2}, "heads": {"type": "categorical", "choices": [1, 2]},
                   "width": {"type": "int", "low": 16, "high": 48, "step": 16},
                   "mult": {"type": "categorical", "choices": [2, 4], "per_layer": "depth"}},
        "architecture": {"kind": "decoder", "vocab_size": 8, "max_seq_len": 8, "d_model": "=width",
                         "decoder": {"n_layers": "=depth", "attention": {"n_heads": "=heads", "masks": ["causal"]}}},
    }, "grid.yaml")
    assert grid_of(space) == {"depth": [1, 2], "heads": [1, 2], "width": [16, 32, 48], "mult.layer0": [2, 4], "mult.layer1": [2, 4]}


#: what a task needs beyond its defaults (task=text: files; the standard library's are on every machine)
TASK_NEEDS = {"text": [f"task.data.paths=[{sysconfig.get_paths()['stdlib']}/email/**/*.py]"]}


@pytest.mark.parametrize("task", _options("task"))
def test_every_task_builds_batches_of_its_declared_sizes(task, tmp_path):
    needs = TASK_NEEDS.get(task, [])
    if task == "text_classification":  # a file of one's own, made here
        (tmp_path / "rows.csv").write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(40)))
        needs = [f"task.data.path={tmp_path}/rows.csv"]
    cfg = compose_conf("sweep", [f"task={task}", f"run_root={tmp_path}", *needs])
    data = build_task(cfg)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    first = batch.get("tokens", batch.get("src"))
    assert first.shape[1] <= data.seq_len
    assert 0 <= int(first.min()) and int(first.max()) < data.vocab_size
    assert "seq_len" not in cfg.task  # the composed config is left as composed
    assert 0 < data.trivial_loss() < 10


@pytest.mark.parametrize("pruner", _options("pruner"))
def test_every_pruner_stops_a_hopeless_trial_and_keeps_a_good_one(pruner):
    """Each pruner config, on the trainer's validation steps (curves straight in log(step), as
    language-model losses roughly are), after 30 trials that each beat the
    ones before (enough for every Hyperband bracket; none of them is stopped): a trial far worse
    at every validation is stopped before the last one (by `none` never; `threshold` keeps
    finite values by default, so its hopeless trials are NaN), and one better than all is not."""
    cfg = compose_conf("sweep", [f"pruner={pruner}"])
    last, every = cfg.trainer.max_steps, cfg.trainer.val_check_interval
    steps = range(every, last + 1, every)
    x = optuna.distributions.FloatDistribution(0, 1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), pruner=instantiate(cfg.pruner))

    def stopped_at(value_at) -> int | None:
        trial = study.ask({"x": x})
        for step in steps:
            trial.report(value_at(step), step)
            if step < last and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return step
        study.tell(trial, value_at(last))
        return None

    for i in range(30):  # each better than the ones before: the best so far is never stopped
        assert stopped_at(lambda step, i=i: 3.0 - 0.01 * i - 0.1 * math.log(step)) is None
    # Hyperband assigns each trial a bracket, and a bracket whose first rung is the last step
    # never stops a trial: of several hopeless trials, those in the other brackets are stopped
    hopeless = [stopped_at(lambda step: float("nan") if pruner == "threshold" else 9.0) for _ in range(6)]
    stopped = [step for step in hopeless if step is not None]
    assert (not stopped) == (pruner == "none")
    if pruner == "hyperband":  # the first rung is the second validation (conf/pruner/hyperband.yaml)
        assert min(stopped) == 2 * every
    assert stopped_at(lambda step: 1.0 - 0.1 * math.log(step)) is None


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_every_trainer_config_makes_a_lightning_trainer(trainer):
    cfg = compose_conf("sweep", [f"trainer={trainer}"])
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    built = L.Trainer(**cfg.trainer, logger=False, enable_checkpointing=False)
    loop = LoopSettings.from_config(OmegaConf.to_container(cfg.trainer, resolve=True))  # what a sweep trial reads
    for name in ("max_steps", "val_check_interval", "limit_val_batches", "gradient_clip_val", "log_every_n_steps"):
        assert getattr(built, name) == getattr(loop, name) == cfg.trainer[name], name
    assert type(built.accelerator).__name__.lower().startswith({"cpu": "cpu", "gpu": "cuda", "auto": ""}[cfg.trainer.accelerator])


# (the servers, PostgreSQL and the gRPC proxy, have tests of their own: test_postgres, test_grpc)
@pytest.mark.parametrize("storage", [s for s in _options("storage") if s not in ("postgres", "grpc")])
def test_file_storages_open_under_the_run_root(storage, tmp_path):
    cfg = compose_conf("sweep", [f"storage={storage}", f"run_root={tmp_path}"])
    opened = open_storage(cfg.storage)
    optuna.create_study(storage=opened, study_name="s")
    assert list(tmp_path.iterdir())


def test_unknown_group_options_list_the_available_ones():
    with pytest.raises(MissingConfigException, match=r"(?s)task/nope.*lm_stdlib.*recall"):
        compose_conf("sweep", ["task=nope"])
    with pytest.raises(MissingConfigException, match=r"(?s)space/wide.*decoder.*tiny"):
        compose_conf("sweep", ["space=wide"])


def test_an_unreachable_storage_is_a_clear_error_before_any_trial(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "storage=postgres", "storage.url=postgresql+psycopg2://qkv@127.0.0.1:9/none")
    with pytest.raises(StorageError, match=r"cannot open storage postgresql\+psycopg2://qkv@127.0.0.1:9/none"):
        sweep(cfg)
    assert not (tmp_path / cfg.study_name).exists()


@pytest.mark.parametrize(
    ("objectives", "message"),
    [([], "give at least one"), (["loss"], "unknown 'loss'; valid: val_loss"), (["n_params"], "first objective must be trained"),
     (["val_loss", "val_loss"], "twice")],
)
def test_bad_objectives_are_refused(objectives, message):
    with pytest.raises(ValueError, match=message):
        check_objectives(objectives)


def test_a_space_that_cannot_fit_the_task_is_refused_before_any_trial(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "space=encoder_decoder")
    with pytest.raises(ValueError, match=r"none of 50 random samples is feasible.*a language_model task trains a decoder architecture, got 'encoder_decoder'"):
        sweep(cfg)
    with pytest.raises(ValueError, match=r"none of 50 random samples is feasible.*head.n_classes: must be >= 2, got 0"):
        sweep(tiny_sweep_conf(tmp_path, "space=encoder"))
    assert not (tmp_path / "studies.db").exists()


def test_check_compatible_names_each_mismatch():
    from qkvsearch.models import ArchConfig

    cfg = compose_conf("sweep", ["task=digits"])
    task = build_task(cfg)
    arch = ArchConfig.from_dict({"kind": "encoder", "vocab_size": 5, "max_seq_len": 8, "d_model": 8, "encoder": {"n_layers": 1, "attention": {"n_heads": 2}},
                                 "head": {"name": "classifier", "n_classes": 3}})
    with pytest.raises(ValueError, match=r"vocab_size: the task has 17 tokens.*max_seq_len.*64.*head: the task has 10 classes"):
        check_compatible(arch, task)


@pytest.mark.slow
def test_qkv_train_trains_a_study_trial_longer_and_keeps_its_best_weights(tmp_path):
    sweep_cfg = tiny_sweep_conf(tmp_path, "n_trials=1", "pruner=none")
    study = sweep(sweep_cfg)
    cfg = compose_conf("train", [
        f"study_name={sweep_cfg.study_name}", "task=recall", "task.data.n_train=512", "task.data.n_val=128",
        "task.data.n_pairs=4", "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
        f"run_root={tmp_path}", f"out_dir={tmp_path / 'train'}", "show_progress=false",
    ])
    out = train(cfg)
    assert {"arch.yaml", "model.safetensors", "summary.json"} <= {p.name for p in out.iterdir()}
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trial"] == study.best_trial.number and summary["steps"] == 20
    assert summary["selected_on"] == "val_loss" and 0 < summary["test_loss"] < 10  # the held-out split, reported
    with pytest.raises(ValueError, match=r"study .nope. not found in .*; studies: recall-tiny"):
        train(compose_conf("train", ["study_name=nope", f"run_root={tmp_path}", f"out_dir={tmp_path / 'x'}"]))
    with pytest.raises(ValueError, match=r"trial 7 does not exist in study 'recall-tiny' \(it has 1 trials\)"):
        train(compose_conf("train", [f"study_name={sweep_cfg.study_name}", "trial=7", f"run_root={tmp_path}", f"out_dir={tmp_path / 'y'}"]))


class _NotATask:
    kind, vocab_size, seq_len, n_classes = "classification", 0, 8, 1

    def setup(self, stage):
        pass


def test_a_task_that_breaks_the_contract_is_refused_naming_every_problem():
    from qkvsearch.tasks.base import Task, check_task

    with pytest.raises(ValueError, match=r"task 'mine': _NotATask does not meet the task contract .*"
                                         r"lacks 'sample_batch'; lacks 'trivial_loss'"):
        check_task(_NotATask(), "mine")
    _NotATask.sample_batch = lambda self, n: {}
    _NotATask.trivial_loss = lambda self: 1.0
    with pytest.raises(ValueError, match=r"vocab_size must be a positive int, got 0; n_classes must be an int >= 2"):
        check_task(_NotATask(), "mine")
    digits = build_task(compose_conf("sweep", ["task=digits"]))
    assert isinstance(digits, Task) and check_task(digits, "digits").n_classes == 10


def test_a_prefix_that_leaves_the_tasks_sequences_nothing_to_score_does_not_fit():
    from qkvsearch.models import ArchConfig
    from qkvsearch.tasks.base import TaskSizes

    arch = ArchConfig.from_dict({"kind": "decoder", "vocab_size": 16, "max_seq_len": 64, "d_model": 16,
                                 "decoder": {"n_layers": 1, "attention": {"n_heads": 2, "masks": [
                                     {"name": "prefix_lm", "prefix_len": 40}]}}})
    with pytest.raises(ValueError, match=r"prefix_len: a prefix-LM prefix of 40 leaves no position of the task's 32-token"):
        check_compatible(arch, TaskSizes("language_model", 16, 32, None))
    check_compatible(arch, TaskSizes("language_model", 16, 64, None))  # the same prefix leaves a 64-token task 24
