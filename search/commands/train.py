"""``qkv train``: train one architecture (a config file, or a study's trial) on a task."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import lightning as L
import optuna
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from qkvsearch.models import ArchConfig, count_parameters, flops_per_token
from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import OPTIM, TASK
from qkvsearch.search.base.settings import check_one_source, sign_of
from qkvsearch.search.base.weights import save_weights
from qkvsearch.search.inspect.choose import select_trial
from qkvsearch.search.inspect.selection import architecture
from qkvsearch.search.study.prepare import build_task, task_of_study
from qkvsearch.search.study.storage import load_named_study
from qkvsearch.search.trial.callbacks import BestWeights
from qkvsearch.search.trial.evaluate import score, test_loader
from qkvsearch.search.trial.lit import LitTransformer, check_compatible, quiet_lightning


def load_arch(cfg: DictConfig, study: optuna.Study | None = None) -> tuple[ArchConfig, dict[str, Any], optuna.Study | None]:
    """The architecture to train, where it came from (with a study's trial, the optimiser
    settings its space sampled, under ``optim``), and its study (None for a file).

    Raises:
        QkvError: neither or both of ``arch`` and ``study_name`` given, a missing file,
            or a study or trial that does not exist or never completed.
    """
    check_one_source(cfg.arch, cfg.study_name)
    if cfg.arch is not None:
        path = pathlib.Path(cfg.arch)
        if not path.is_file():
            raise QkvError(f"arch: no file at {path}")
        return ArchConfig.from_dict(yaml.safe_load(path.read_text())), {"arch_file": str(path.resolve())}, None
    study = study if study is not None else load_named_study(cfg.storage, cfg.study_name)
    trial = select_trial(study, cfg.trial)  # a number, or the best (by its mean over seeds where finalists ran)
    source = {"study": cfg.study_name, "trial": trial.number, "optim": trial.user_attrs.get(OPTIM, {})}
    return architecture(study, trial), source, study


def task_overridden() -> bool:
    """True when the command line chose the task (``task=...`` or ``task.x=...``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and any(o.startswith(("task=", "task.")) for o in HydraConfig.get().overrides.task)


def train(cfg: DictConfig, study: optuna.Study | None = None) -> pathlib.Path:
    """Trains and writes ``arch.yaml``, ``model.safetensors`` (best weights) and metrics to ``out_dir``.
    ``study``: the one ``cfg.study_name`` names, when the caller has loaded it already."""
    quiet_lightning()
    L.seed_everything(cfg.seed, verbose=False)
    arch, source, study = load_arch(cfg, study)
    # a study's trial trains on the task the study was made with, unless the command line chooses one
    from_study = study is not None and not task_overridden()
    task = task_of_study(study) if from_study else build_task(cfg)
    task_name = study.user_attrs.get(TASK, cfg.task.name) if from_study else cfg.task.name
    check_compatible(arch, task)
    out = pathlib.Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the trial's sampled settings (its learning rate) win over the command's defaults
    optim = {**OmegaConf.to_container(cfg.optim, resolve=True), **source.get("optim", {}), "max_steps": cfg.trainer.max_steps}
    lit = LitTransformer(arch, task.kind, **optim)
    # the checkpoint is chosen on the task's own metric: accuracy for classification
    monitor = "val_acc" if task.kind == "classification" else "val_loss"
    best = BestWeights(monitor, sign=sign_of(monitor))
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True), max_epochs=-1, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=cfg.show_progress, logger=CSVLogger(str(out), name="", version="logs"), callbacks=[best],
    )
    start = time.perf_counter()
    trainer.fit(lit, datamodule=task)
    if best.state is None:
        raise RuntimeError("training ended before its first validation; raise trainer.max_steps")
    (out / "arch.yaml").write_text(yaml.safe_dump(arch.to_dict(), sort_keys=False))
    save_weights(best.state, out / "model.safetensors", arch.fingerprint())
    chosen = sign_of(monitor) * best.best
    summary = {
        **source, "task": task_name, "selected_on": monitor, monitor: chosen, "best_step": best.best_step,
        "steps": trainer.global_step, "seconds": time.perf_counter() - start,
        "n_params": count_parameters(arch), "flops_per_token": flops_per_token(arch),
        "trivial_val_loss": task.trivial_loss(), "torch": torch.__version__,
    }
    loader = test_loader(task)
    if loader is not None:  # held out: reported, never selected on
        summary.update(score(arch, task.kind, out / "model.safetensors", loader))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    tested = (f"; test_loss {summary['test_loss']:.4f}, test_acc {summary['test_acc']:.4f}" if "test_loss" in summary else "")
    print(f"best {monitor} {chosen:.4f} at step {best.best_step} (trivial baseline val_loss "
          f"{summary['trivial_val_loss']:.4f}){tested}; written to {out}")
    return out
