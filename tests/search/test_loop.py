"""A sweep trial's loop (Lightning Fabric) trains exactly as ``qkv train``'s Trainer does."""

from __future__ import annotations

import csv

import lightning as L
import optuna
import pytest
import torch

from qkvsearch.models import ArchConfig
from qkvsearch.models.errors import QkvError
from qkvsearch.search.study.prepare import build_task
from qkvsearch.search.trial.callbacks import BestWeights, OptunaPruning
from qkvsearch.search.trial.lit import LitTransformer, quiet_lightning
from qkvsearch.search.trial.loop import LoopSettings, fit
from tests.conftest import tiny_sweep_conf

ARCH = {"kind": "decoder", "vocab_size": 64, "max_seq_len": 64, "d_model": 16, "positions": "rotary",
        "decoder": {"n_layers": 2, "attention": {"n_heads": 2, "masks": ["causal"]}, "ffn": {"name": "gelu", "d_ff": 32}}}
SETTINGS = {"max_steps": 30, "val_check_interval": 10, "limit_val_batches": 2, "gradient_clip_val": 0.5,
            "log_every_n_steps": 5, "accelerator": "cpu", "devices": 1, "precision": "32-true"}


def _task(tmp_path):
    task = build_task(tiny_sweep_conf(tmp_path))
    assert task.kind == "language_model" and task.vocab_size <= ARCH["vocab_size"]
    return task


def test_the_trial_loop_follows_the_trainers_curve_and_weights(tmp_path):
    quiet_lightning()
    arch = ArchConfig.from_dict(ARCH)
    runs = {}
    for name in ("fabric", "trainer"):
        task = _task(tmp_path)
        L.seed_everything(3, verbose=False)
        lit = LitTransformer(arch, task.kind, lr=1e-2, warmup_steps=5, max_steps=SETTINGS["max_steps"])
        best = BestWeights("val_loss")
        if name == "fabric":
            fit(lit, task, LoopSettings(**SETTINGS), [best], tmp_path / name)
        else:
            trainer = L.Trainer(**SETTINGS, max_epochs=-1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                                logger=False, callbacks=[best])
            trainer.fit(lit, datamodule=task)
        runs[name] = (best.history, lit.model.state_dict())
    (fabric_history, fabric_state), (trainer_history, trainer_state) = runs["fabric"], runs["trainer"]
    assert [s for s, _ in fabric_history] == [s for s, _ in trainer_history] == [10, 20, 30]
    torch.testing.assert_close([v for _, v in fabric_history], [v for _, v in trainer_history], rtol=1e-5, atol=1e-6)
    assert fabric_history[-1][1] < fabric_history[0][1]  # it learned something, so equal curves mean something
    for key, value in trainer_state.items():
        torch.testing.assert_close(fabric_state[key], value, rtol=1e-4, atol=1e-6, msg=key)
    with open(tmp_path / "fabric" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("val_loss")] == [10, 20, 30]
    assert [int(r["step"]) for r in rows if r.get("train_loss")] == [5, 10, 15, 20, 25, 30]


def test_mixed_precision_runs_the_trial_loops_matmuls_in_bf16_as_the_trainer_does(tmp_path):
    # Fabric enters autocast only inside a wrapped model's forward, and `model.loss` on one
    # device is not one: the loop must enter it itself, in training and in validation.
    quiet_lightning()
    settings = {**SETTINGS, "precision": "bf16-mixed", "max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1}
    seen = {}
    for name in ("fabric", "trainer"):
        task = _task(tmp_path)
        lit = LitTransformer(ArchConfig.from_dict(ARCH), task.kind, max_steps=settings["max_steps"])
        dtypes = seen[name] = set()
        projection = next(m for m in lit.model.modules() if isinstance(m, torch.nn.Linear))
        projection.register_forward_hook(lambda module, args, out, dtypes=dtypes: dtypes.add((module.training, out.dtype)))
        if name == "fabric":
            fit(lit, task, LoopSettings(**settings), [])
        else:
            L.Trainer(**settings, max_epochs=-1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                      enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                      logger=False).fit(lit, datamodule=task)
    assert seen["fabric"] == seen["trainer"] == {(True, torch.bfloat16), (False, torch.bfloat16)}


def test_the_pruner_stops_the_loop_at_the_validation_it_prunes(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any loss is too high
    trial = study.ask()
    task = _task(tmp_path)
    lit = LitTransformer(ArchConfig.from_dict(ARCH), task.kind, max_steps=30)
    seen = []

    class Steps:
        def on_train_step(self, step, max_steps, loss):
            seen.append(step)

    with pytest.raises(optuna.TrialPruned, match="at step 10"):
        fit(lit, task, LoopSettings(**SETTINGS), [Steps(), OptunaPruning(trial, "val_loss")])
    assert seen == list(range(1, 11))
    assert list(trial.study.trials[0].intermediate_values) == [10]


@pytest.mark.parametrize(("trainer", "message"), [
    ({"max_steps": 0}, r"trainer\.max_steps must be an integer >= 1, got 0"),
    ({"max_steps": 60, "val_check_interval": 100},
     r"trainer\.max_steps \(60\) is below trainer\.val_check_interval \(100\): no trial would ever validate"),
    ({"limit_val_batches": 1.5}, r"trainer\.limit_val_batches must be a batch count >= 1 or a fraction in \(0, 1\], got 1.5"),
    ({"gradient_clip_val": -1}, r"trainer\.gradient_clip_val must be null or a number > 0, got -1"),
    ({"devices": "auto"}, r"trainer\.devices must be an integer >= 1 in a sweep trial \(each trial's processes\), got 'auto'"),
    ({"devices": 2, "strategy": "fsdp"}, r"trainer\.strategy must be ddp \(or auto\) for a trial on devices=2, got 'fsdp'"),
    ({"max_epoch": 3}, r"trainer\.max_epoch: not a setting of a sweep trial; valid: accelerator, devices, "),
])
def test_bad_trainer_settings_are_refused_naming_the_field(trainer, message):
    with pytest.raises(QkvError, match=message):
        LoopSettings.from_config({**SETTINGS, **trainer})


def test_the_last_validation_is_reported_but_never_pruned(tmp_path):
    # Hyperband's rungs can fall on the last step (min_resource 200 of 600): pruning there
    # threw away a trial that had trained in full
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any loss is too high
    trial = study.ask()
    task = _task(tmp_path)
    settings = LoopSettings(**{**SETTINGS, "max_steps": 20})
    lit = LitTransformer(ArchConfig.from_dict(ARCH), task.kind, max_steps=20)
    with pytest.raises(optuna.TrialPruned, match="at step 10"):
        fit(lit, task, settings, [OptunaPruning(trial, "val_loss", last_step=30)])
    trial = study.ask()
    lit = LitTransformer(ArchConfig.from_dict(ARCH), task.kind, max_steps=20)
    only_last = LoopSettings(**{**SETTINGS, "max_steps": 20, "val_check_interval": 20})
    fit(lit, task, only_last, [OptunaPruning(trial, "val_loss", last_step=20)])  # trains to the end
    assert list(study.trials[1].intermediate_values) == [20]
