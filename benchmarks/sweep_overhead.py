"""How much of a trial is training, and how fast a trial trains against a plain loop.

Runs real trials of about 20 seconds (the default CPU task, one fixed architecture, a real
SQLite study) through the sweep's own worker path (lock, ask, sample, build, Lightning
Trainer, tell), and beside each one a plain PyTorch loop training the same model on the
same batches with the same optimiser, schedule and gradient clipping. Prints:

- overhead share: the part of a trial's wall time (ask to tell) spent outside training
  and validation batches (study I/O, sampling, building, Trainer set-up, saving);
- throughput ratio: the trial's training tokens/s over the plain loop's (both measure
  the training loop, data loading included, validation excluded), by wall time and by
  this process's CPU time; CPU time is the steadier of the two on a shared machine,
  where other tenants steal wall time from either side at random.

Run: python benchmarks/sweep_overhead.py [--rounds 2] [--steps 600]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import lightning as L
import optuna
import torch
from hydra import compose, initialize_config_dir

from qkvsearch.search.lit import LitTransformer
from qkvsearch.search.objective import quiet_lightning
from qkvsearch.search.storage import create_or_load_study, open_storage
from qkvsearch.search.sweep import build_space, build_task, next_trial, prepare, run_trial

CONF = str(pathlib.Path(__file__).resolve().parent.parent / "conf")
ARCH = {
    "n_layers": 3, "d_model": 64, "n_heads": 4, "positions": "rotary", "scaling": "sqrt_dk",
    "mask": "causal", "ffn": "gelu", "ffn_mult": 4,
}


class BatchTimer(L.Callback):
    """Wall time inside training batches (forward, backward, optimiser step) and validation."""

    def __init__(self) -> None:
        self.train = self.val = self.fit = 0.0
        self.fit_cpu = self.val_cpu = 0.0
        self.tokens = 0

    def on_fit_start(self, trainer, module) -> None:
        self._fit_start, self._fit_cpu = time.perf_counter(), time.process_time()

    def on_fit_end(self, trainer, module) -> None:
        self.fit = time.perf_counter() - self._fit_start
        self.fit_cpu = time.process_time() - self._fit_cpu

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        self.tokens += batch["tokens"].numel()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train += time.perf_counter() - self._start

    def on_validation_start(self, trainer, module) -> None:
        self._val_start, self._val_cpu = time.perf_counter(), time.process_time()

    def on_validation_end(self, trainer, module) -> None:
        self.val += time.perf_counter() - self._val_start
        self.val_cpu += time.process_time() - self._val_cpu


def one_trial(cfg, timers: list[BatchTimer]) -> tuple[float, BatchTimer]:
    setup = prepare(cfg)
    setup.objective.callbacks = lambda: [timers.append(BatchTimer()) or timers[-1]]
    start = time.perf_counter()
    trial = next_trial(setup)
    run_trial(setup, trial)
    wall = time.perf_counter() - start
    state = setup.study.trials[-1].state.name
    if state != "COMPLETE":
        raise RuntimeError(f"the benchmark trial ended {state}: {setup.study.trials[-1].user_attrs}")
    return wall, timers[-1]


def plain_loop(cfg, steps: int) -> tuple[float, float, int]:
    """Same model, batches, optimiser, schedule and clipping, in a bare loop."""
    task = build_task(cfg)
    space = build_space(cfg, task)
    study = optuna.create_study()
    study.enqueue_trial(ARCH)
    arch = space.suggest(study.ask())
    torch.manual_seed(0)
    lit = LitTransformer(arch, task.kind, **cfg.optim, max_steps=steps)
    optimizers = lit.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    task.setup("fit")
    lit.train()
    done, tokens = 0, 0
    start, start_cpu = time.perf_counter(), time.process_time()
    while done < steps:
        for batch in task.train_dataloader():
            loss = lit.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lit.parameters(), cfg.trainer.gradient_clip_val)
            optimizer.step()
            scheduler.step()
            tokens += batch["tokens"].numel()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start, time.process_time() - start_cpu, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as root, initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for round_ in range(args.rounds):
            cfg = compose("sweep", [f"run_root={root}", f"study_name=bench{round_}", "n_trials=1", "pruner=none",
                                    "sampler=random", f"trainer.max_steps={args.steps}", "objectives=[val_loss]"])
            study = create_or_load_study(open_storage(cfg.storage), cfg.study_name, ["minimize"],
                                         optuna.samplers.RandomSampler(), optuna.pruners.NopPruner())
            study.enqueue_trial(ARCH)
            timers: list[BatchTimer] = []
            if round_ % 2:  # alternate the order (ABBA) so slow drift of the machine cancels out
                plain_s, plain_cpu, plain_tokens = plain_loop(cfg, args.steps)
                wall, timer = one_trial(cfg, timers)
            else:
                wall, timer = one_trial(cfg, timers)
                plain_s, plain_cpu, plain_tokens = plain_loop(cfg, args.steps)
            trial_tps, plain_tps = timer.tokens / (timer.fit - timer.val), plain_tokens / plain_s
            cpu_ratio = (timer.tokens / (timer.fit_cpu - timer.val_cpu)) / (plain_tokens / plain_cpu)
            overhead = wall - timer.train - timer.val
            rows.append((overhead / wall, trial_tps / plain_tps, cpu_ratio))
            print(f"round {round_}: trial {wall:.1f} s, outside train/val batches {overhead:.2f} s "
                  f"({100 * overhead / wall:.1f}%); training {trial_tps:,.0f} tok/s vs plain loop {plain_tps:,.0f} tok/s: "
                  f"{trial_tps / plain_tps:.3f}x by wall time, {cpu_ratio:.3f}x by CPU time")
    print(f"median over {args.rounds} rounds: overhead share {100 * statistics.median(r[0] for r in rows):.1f}% "
          f"(goal <= 5%); throughput vs plain loop {statistics.median(r[1] for r in rows):.3f}x by wall time, "
          f"{statistics.median(r[2] for r in rows):.3f}x by CPU time (goal >= 0.95x)")


if __name__ == "__main__":
    main()
