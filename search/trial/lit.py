"""The LightningModule that trains any built model on any task kind."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import optuna
import torch
import torch.nn.functional as F
from torch import nn

from qkvsearch.models import ArchConfig, build_model
from qkvsearch.models.errors import QkvError
from qkvsearch.tasks.base import IGNORE

#: The architecture kind each task kind trains.
ARCH_FOR_TASK = {"language_model": "decoder", "classification": "encoder", "seq2seq": "encoder_decoder"}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def _lm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["tokens"], batch.get("padding_mask"))  # [batch, seq, vocab]
    return logits, batch["targets"]


def _classification_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch["tokens"], batch.get("padding_mask")), batch["labels"]  # [batch, classes]


def _seq2seq_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["src"], batch["tgt_in"], batch["src_padding_mask"], batch["tgt_padding_mask"])
    return logits, batch["tgt_out"]


STEPS: dict[str, Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]] = {
    "language_model": _lm_step,
    "classification": _classification_step,
    "seq2seq": _seq2seq_step,
}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The input tokens a batch trains on (source and target sides of seq2seq both count)."""
    return sum(v.numel() for k, v in batch.items() if k in ("tokens", "src", "tgt_in"))


def check_compatible(arch: ArchConfig, task: Any) -> None:
    """Raises ValueError when ``arch`` cannot be trained on ``task``, naming the mismatch."""
    problems = []
    wanted = ARCH_FOR_TASK.get(task.kind)
    if wanted is None:
        problems.append(f"task kind {task.kind!r} is unknown; valid: {', '.join(ARCH_FOR_TASK)}")
    elif arch.kind != wanted:
        problems.append(f"kind: a {task.kind} task trains a {wanted} architecture, got {arch.kind!r}")
    if arch.vocab_size < task.vocab_size:
        problems.append(f"vocab_size: the task has {task.vocab_size} tokens, the architecture {arch.vocab_size}")
    if arch.max_seq_len < task.seq_len:
        problems.append(f"max_seq_len: the task's sequences are {task.seq_len} long, the architecture's limit {arch.max_seq_len}")
    unscored = arch.unscored_positions()
    if task.kind in ("language_model", "seq2seq") and unscored >= task.seq_len - 1:
        problems.append(f"prefix_len: a prefix-LM prefix of {unscored + 1} leaves no position of the task's "
                        f"{task.seq_len}-token sequences to score but the last; lower it below {task.seq_len - 1}")
    outputs = arch.head.n_outputs(arch.vocab_size)
    if task.kind == "classification" and (arch.head.per_token or outputs != task.n_classes):
        problems.append(f"head: the task has {task.n_classes} classes; the head gives {outputs} outputs per {'token' if arch.head.per_token else 'sequence'}")
    if problems:
        raise QkvError("architecture does not fit the task: " + "; ".join(problems))


class LitTransformer(L.LightningModule):
    """Trains ``build_model(arch)`` with AdamW, linear warm-up and cosine decay.

    Args:
        arch: the architecture.
        task_kind: ``language_model``, ``classification`` or ``seq2seq``.
        lr, weight_decay, warmup_steps, min_lr_ratio: the optimiser and schedule.
        max_steps: the schedule's length (the trainer's ``max_steps``).
    """

    def __init__(self, arch: ArchConfig, task_kind: str, lr: float = 3e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 20, min_lr_ratio: float = 0.1, max_steps: int = 1000) -> None:
        super().__init__()
        if task_kind not in STEPS:
            raise QkvError(f"task_kind {task_kind!r} is unknown; valid: {', '.join(STEPS)}")
        self.arch = arch
        self.model = build_model(arch)
        self.step_fn = STEPS[task_kind]
        #: leading target positions a decoder could see (a prefix-LM's prefix): never scored
        self.unscored = arch.unscored_positions() if task_kind in ("language_model", "seq2seq") else 0
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.min_lr_ratio, self.max_steps = min_lr_ratio, max_steps
        self.tokens_seen = 0

    def set_runner(self, runner: nn.Module | None) -> None:
        """Runs forward passes through ``runner`` (a ``torch.compile`` of ``self.model``,
        sharing its parameters) instead of the model itself; None: the model. Kept out of
        the submodules, so parameters and state dicts stay those of ``self.model``."""
        self.__dict__["_runner"] = runner

    @property
    def runner(self) -> nn.Module:
        runner = self.__dict__.get("_runner")
        return self.model if runner is None else runner

    def logits_and_targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``[n, outputs]`` logits (float32) and ``[n]`` targets of a batch."""
        logits, targets = self.step_fn(self.runner, batch)
        if self.unscored:
            targets = targets.clone()
            targets[:, : self.unscored] = IGNORE
        return logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: cross-entropy over the scored targets."""
        logits, targets = self.logits_and_targets(batch)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"training loss became {loss.item()} at step {self.global_step}")
        self.tokens_seen += batch_tokens(batch)
        trainer = self._trainer
        # logging costs a little every step: log only when a logger or a progress bar reads it
        if trainer is None or trainer.progress_bar_callback is not None or self.global_step % trainer.log_every_n_steps == 0:
            self.log("train_loss", loss.detach(), prog_bar=True)
        return loss

    def val_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A validation batch's mean loss over its scored targets, how many of them the
        argmax gets right, and how many there are."""
        logits, targets = self.logits_and_targets(batch)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
        scored = targets != IGNORE
        correct = (logits.argmax(-1) == targets)[scored].sum()
        return loss, correct, int(scored.sum())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, correct, n = self.val_sums(batch)
        self.log("val_loss", loss, batch_size=n, prog_bar=True)
        self.log("val_acc", correct.float() / max(n, 1), batch_size=n)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:  # one fused kernel per step instead of a loop over tensors: 4x less optimiser time on a CPU
            optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.98), fused=True)
        except RuntimeError:  # a device or dtype without the fused kernel
            optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.98))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """The Trainer's clipping, for the fused AdamW too. Lightning's mixed-precision plugin
        refuses to clip for an optimiser that unscales its own gradients, in case they are
        still scaled; under bf16 nothing is scaled, and under fp16 they are unscaled here
        first (the gradient scaler then knows not to unscale them again)."""
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def quiet_lightning() -> None:
    """Keeps Lightning's per-trial start-up chatter, and warnings about choices made here
    on purpose, out of the sweep's output."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # batches are whole tensors sliced in the main process; no loader workers are wanted
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    # a machine with SLURM installed is not a SLURM job: qkv's SLURM jobs come from submitit
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system.*")
    # heartbeats are recorded by the worker loop (ask/tell), not Study.optimize
    warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
