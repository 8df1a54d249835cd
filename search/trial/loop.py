"""A sweep trial's training loop, on Lightning Fabric.

A sweep runs many short trials, where the Trainer's per-step machinery (hook dispatch,
loop bookkeeping, result collections) costs a large share of a small model's step (see
``benchmarks/trial_speed.py``). A trial therefore trains with Fabric: the same
accelerators, devices, strategies and precision plugins, the same ``LitTransformer`` loss,
optimiser and schedule, the same validation as ``qkv train``'s Trainer (a test holds the
two to the same curve), with a loop that does only what a trial needs. Callbacks are
Fabric callbacks: objects with any of

- ``on_train_step(step, max_steps, loss)``: after each optimiser step (``loss`` a tensor);
- ``on_validation(step, metrics)``: after each validation (``metrics`` holds ``val_loss``
  and ``val_acc`` as floats); it may raise ``optuna.TrialPruned`` to stop the trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import platform
import time
from collections.abc import Iterator
from typing import Any

import optuna
import torch

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base import signals
from qkvsearch.search.base.settings import LoopSettings
from qkvsearch.search.trial.lit import LitTransformer, NonFiniteLoss, batch_tokens


@dataclasses.dataclass
class FitResult:
    tokens: int
    #: the last validation's metrics
    metrics: dict[str, float]
    #: where it trained, as torch names it ("cpu", "cuda:0"), and the device's own name
    device: str
    device_name: str
    #: seconds in training steps (validation excluded)
    train_seconds: float
    #: the device's peak allocated memory (CUDA only)
    peak_memory_bytes: int | None
    #: whether the model ran through torch.compile, and why not where it was asked to
    compiled: bool = False
    compile_fallback: str | None = None
    #: processes that trained together (``tokens`` counts all of theirs)
    world_size: int = 1


def make_fabric(settings: LoopSettings, folder: pathlib.Path | None, callbacks: list[Any]) -> Any:
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger
    from lightning.fabric.strategies import DDPStrategy

    loggers = [CSVLogger(str(folder), name="", version="logs")] if folder is not None else []
    strategy: Any = settings.strategy
    if settings.world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():  # Fabric would start copies of this whole command
            raise QkvError("a multi-device trial runs in the process group of search/trial/ranks.py's helper_ranks")
        strategy = DDPStrategy(process_group_backend=dist.get_backend())
    fabric = Fabric(accelerator=settings.accelerator, devices=settings.devices, precision=settings.precision,
                    strategy=strategy, callbacks=callbacks, loggers=loggers)
    if settings.world_size > 1:
        fabric.launch()  # joins the process group the helper ranks join
    return fabric


def _forever(loader: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of pass after pass over one loader (a shuffled loader draws a fresh order for
    each pass, as under the Trainer)."""
    while True:
        yield from loader


def validate(lit: LitTransformer, batches: Any, fabric: Any, move: bool) -> dict[str, float]:
    """``val_loss`` (mean over scored targets) and ``val_acc`` over ``batches``, in
    ``fabric``'s precision (batches moved to its device when ``move``)."""
    lit.eval()
    loss_sum, correct, n = torch.zeros((), dtype=torch.float64), 0, 0
    with torch.inference_mode(), fabric.autocast():
        for batch in batches:
            signals.check()
            batch_loss, batch_correct, batch_n = lit.val_sums(fabric.to_device(batch) if move else batch)
            loss_sum += batch_loss.double().cpu() * batch_n
            correct += int(batch_correct)
            n += batch_n
    lit.train()
    return {"val_loss": float(loss_sum / max(n, 1)), "val_acc": correct / max(n, 1)}


def _why(error: BaseException) -> str:
    """An error's type and first line, for a trial attribute."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:500]


#: torch.compile modes that capture CUDA graphs, which need a CUDA device and static shapes
GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_model(lit: LitTransformer, backend: str, mode: str | None = None, device_type: str = "cpu") -> str | None:
    """Runs ``lit``'s forward passes through ``torch.compile``; returns why not (or why not
    in ``mode``) when that fails. A graph-capturing mode off CUDA compiles in the default
    mode instead, saying so: on a CPU there is no launch overhead for graphs to save."""
    note = None
    if mode in GRAPH_MODES and device_type != "cuda":
        note, mode = f"compile_mode={mode} captures CUDA graphs; on {device_type} the default mode ran", None
    try:
        lit.set_runner(torch.compile(lit.model, backend=backend, mode=mode))
    except Exception as error:  # noqa: BLE001 - any failure of the compiler leaves the eager model
        lit.set_runner(None)
        return _why(error)
    return note


def _is_compile_error(error: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(error, TorchDynamoException)


class _Run:
    """One trial's training on Fabric: the set-up model, optimiser, schedule and loaders,
    and what the loop has counted so far."""

    def __init__(self, lit: LitTransformer, task: Any, settings: LoopSettings, fabric: Any,
                 compile_backend: str | None, compile_mode: str | None = None) -> None:
        self.lit, self.settings, self.fabric = lit, settings, fabric
        if fabric.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores for what runs in fp32
        self.fallback = (compile_model(lit, compile_backend, compile_mode, fabric.device.type)
                         if compile_backend else None)
        task.setup("fit")
        optimizers = lit.configure_optimizers()
        self.scheduler = optimizers["lr_scheduler"]["scheduler"]
        self.model, self.optimizer = fabric.setup(lit, optimizers["optimizer"])
        # through DDP's hooks where a strategy wraps the model; the precision plugin's autocast is
        # entered around each call below, since Fabric enters it only in a wrapped forward
        self.model.mark_forward_method("loss")
        self.val_loader = task.val_dataloader()
        limit = settings.limit_val_batches
        self.n_val = limit if isinstance(limit, int) else max(1, int(limit * len(self.val_loader)))
        self.move = fabric.device.type != "cpu"  # batches are made on the CPU: nothing to move there
        self.world = fabric.world_size
        batches = _forever(task.train_dataloader())
        if self.world > 1:  # every rank draws the same order (same seed): each trains on every world-th batch
            batches = itertools.islice(batches, fabric.global_rank, None, self.world)
        self.batches = batches
        self.tokens, self.metrics, self.in_validation = 0, {}, 0.0
        # whether any loss so far was NaN or infinite, kept on the device: reading it waits for
        # the device, so it is read only where the loop reads anyway (logging, validation)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=fabric.device)
        self.cuda = fabric.device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(fabric.device)
        lit.train()
        self.start = time.perf_counter()

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.fabric.autocast():
            loss = self.model.loss(batch)
        self.fabric.backward(loss)
        return loss

    def step(self, step: int) -> torch.Tensor:
        """One optimiser step; the first step retries eagerly when compiling it fails."""
        batch = self.fabric.to_device(next(self.batches)) if self.move else next(self.batches)
        try:
            loss = self._loss(batch)
        except Exception as error:
            if step > 1 or self.lit.runner is self.lit.model or not _is_compile_error(error):
                raise
            self.fallback = _why(error)
            self.lit.set_runner(None)  # the first step again, eagerly
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(batch)
        if self.settings.gradient_clip_val is not None:
            self.fabric.clip_gradients(self.model, self.optimizer, max_norm=self.settings.gradient_clip_val,
                                       error_if_nonfinite=False)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += batch_tokens(batch)
        self.nonfinite |= ~torch.isfinite(loss.detach())
        return loss

    def check_and_log(self, step: int, loss: torch.Tensor) -> None:
        """Reads the loss back (only here): stops on a non-finite one, logs it every ``log_every_n_steps``."""
        value = float(loss.detach())
        if self.world > 1:  # one rank's NaN stops them all, at the same step
            self.nonfinite = self.fabric.all_reduce(self.nonfinite.float(), reduce_op="sum") > 0
        if self.nonfinite:
            raise NonFiniteLoss(f"training loss became {value if not math.isfinite(value) else 'non-finite'} "
                                f"by step {step} (checked every {self.settings.log_every_n_steps} steps and at validations)")
        if step % self.settings.log_every_n_steps == 0:
            self.fabric.log("train_loss", value, step=step)

    def validate(self, step: int) -> None:
        """Validates, logs and calls the callbacks; a pruning decision (rank 0's) stops every rank."""
        began = time.perf_counter()
        self.metrics = validate(self.lit, itertools.islice(self.val_loader, self.n_val), self.fabric, self.move)
        self.in_validation += time.perf_counter() - began
        self.fabric.log_dict(self.metrics, step=step)
        pruned = None
        try:
            self.fabric.call("on_validation", step=step, metrics=self.metrics, module=self.lit)
        except optuna.TrialPruned as error:
            if self.world == 1:
                raise
            pruned = str(error)
        if self.world > 1 and (pruned := self.fabric.broadcast(pruned, src=0)) is not None:
            raise optuna.TrialPruned(pruned)

    def result(self) -> FitResult:
        device = self.fabric.device
        if self.cuda:
            torch.cuda.synchronize(device)
        return FitResult(
            tokens=self.tokens * self.world, metrics=self.metrics, device=str(device),  # every rank trained as many
            device_name=torch.cuda.get_device_name(device) if self.cuda else platform.processor() or platform.machine(),
            train_seconds=time.perf_counter() - self.start - self.in_validation,
            peak_memory_bytes=torch.cuda.max_memory_allocated(device) if self.cuda else None,
            compiled=self.lit.runner is not self.lit.model, compile_fallback=self.fallback, world_size=self.world,
        )


def fit(lit: LitTransformer, task: Any, settings: LoopSettings, callbacks: list[Any],
        folder: pathlib.Path | None = None, compile_backend: str | None = None,
        compile_mode: str | None = None) -> FitResult:
    """Trains ``lit`` on ``task`` for ``settings.max_steps`` steps, validating every
    ``val_check_interval`` steps; callbacks as the module docstring says. With ``folder``,
    the losses go to ``folder/logs/metrics.csv``. With ``compile_backend`` the model runs
    through ``torch.compile``; if compiling fails (at once or in the first step) it trains
    eagerly and the result says why."""
    fabric = make_fabric(settings, folder, callbacks)
    run = _Run(lit, task, settings, fabric, compile_backend, compile_mode)
    try:
        for step in range(1, settings.max_steps + 1):
            loss = run.step(step)
            validating = step % settings.val_check_interval == 0
            if step % settings.log_every_n_steps == 0 or validating or step == settings.max_steps:
                run.check_and_log(step, loss)
            fabric.call("on_train_step", step=step, max_steps=settings.max_steps, loss=loss.detach())
            signals.check()  # a Ctrl-C in a sweep stops the trial here, between steps
            if validating:
                run.validate(step)
    finally:
        lit.tokens_seen = run.tokens * run.world  # read for a pruned or failed trial too
        for logger in fabric.loggers:
            logger.finalize("success")
    return run.result()
