"""A whole sweep trial against a plain PyTorch loop doing the same work, side by side.

The trial runs through the sweep's own worker path (a real SQLite study: sample, build,
Lightning Trainer construction, training, validation, pruning reports, the best-weights
copy, saving, tell). Beside it a plain loop trains the same model (same seed, so the same
initial weights) on the same batches with the same AdamW groups, schedule and clipping,
validates as often on as many batches, keeps the best weights and saves them. Rounds
alternate which runs first (ABBA), so slow drift of a shared machine cancels out.

Prints, per architecture, the plain loop's time over the trial's (1.0 = no cost of the
framework; higher is better for the trial) by wall time and by this process's CPU time,
which is the steadier on a shared machine.

Then a duplicate: the same architecture asked for again in the same study takes the first
trial's values without training; its time (sampling, the duplicate look-up, tell) is
printed over the trained trial's.

Run: python benchmarks/trial_speed.py [--rounds 4] [--steps 600] [--threads 1]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import optuna
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

CONF = str(pathlib.Path(__file__).resolve().parent.parent / "conf")
ARCHS = {  # the tiny space's parameters
    "1 layer x 32": {"n_layers": 1, "d_model": 32, "n_heads": 2, "positions": "rotary", "scaling": "sqrt_dk",
                     "mask": "causal", "ffn": "gelu", "ffn_mult": 4},
    "3 layers x 64": {"n_layers": 3, "d_model": 64, "n_heads": 4, "positions": "rotary", "scaling": "sqrt_dk",
                      "mask": "causal", "ffn": "gelu", "ffn_mult": 4},
}


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def trial_run(cfg, params: dict) -> tuple[float, float]:
    """Wall and CPU seconds of one trial, from after ask to after tell (a duplicate when the
    study already trained ``params``)."""
    from qkvsearch.search.study.prepare import prepare
    from qkvsearch.search.study.search import run_trial
    from qkvsearch.search.study.workers import next_trial

    worker = prepare(cfg).worker
    worker.study.enqueue_trial(params)
    trial = next_trial(worker.study, worker.storage, cfg.storage, cfg.n_trials, worker.retry)
    seconds = timed(lambda: run_trial(worker, trial))
    frozen = worker.study.trials[-1]
    if frozen.state.name != "COMPLETE":
        raise RuntimeError(f"the benchmark trial ended {frozen.state.name}: {frozen.user_attrs}")
    return seconds


def plain_run(cfg, params: dict, folder: pathlib.Path) -> tuple[float, float]:
    """Wall and CPU seconds of the same work in a bare loop."""
    from qkvsearch.search.study.prepare import build_space, build_task
    from qkvsearch.search.trial.lit import LitTransformer

    task = build_task(cfg)
    arch = build_space(cfg, task).suggest(optuna.trial.FixedTrial(params))
    steps, every, val_batches = cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.trainer.limit_val_batches

    def run() -> None:
        torch.manual_seed(cfg.seed)
        lit = LitTransformer(arch, task.kind, **cfg.optim, max_steps=steps)
        optimizers = lit.configure_optimizers()
        optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
        task.setup("fit")
        best, best_state, done = float("inf"), None, 0
        lit.train()
        while done < steps:
            for batch in task.train_dataloader():
                loss = lit.loss(batch)
                if not torch.isfinite(loss):
                    raise RuntimeError("non-finite loss")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lit.parameters(), cfg.trainer.gradient_clip_val)
                optimizer.step()
                scheduler.step()
                done += 1
                if done % every == 0:
                    lit.eval()
                    with torch.inference_mode():
                        losses = [lit.loss(b) for b, _ in zip(task.val_dataloader(), range(val_batches), strict=False)]
                    value = float(torch.stack(losses).mean())
                    if value < best:
                        best = value
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in lit.model.state_dict().items()}
                    lit.train()
                if done == steps:
                    break
        save_file(best_state, str(folder / "plain.safetensors"))

    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from qkvsearch.search.trial.lit import quiet_lightning

    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps, validation as trainer=cpu; "
          "ratio = plain loop seconds / trial seconds (1.0: the trial costs nothing extra)")
    with tempfile.TemporaryDirectory() as root, initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for name in args.archs:
            walls, cpus = [], []
            for round_ in range(args.rounds):
                cfg = compose("sweep", [f"run_root={root}", f"study_name=bench{len(walls)}{name[0]}", "n_trials=1",
                                        "pruner=none", "sampler=random", f"trainer.max_steps={args.steps}",
                                        f"threads={args.threads}"])
                if round_ % 2:
                    plain = plain_run(cfg, ARCHS[name], pathlib.Path(root))
                    trial = trial_run(cfg, ARCHS[name])
                else:
                    trial = trial_run(cfg, ARCHS[name])
                    plain = plain_run(cfg, ARCHS[name], pathlib.Path(root))
                walls.append(plain[0] / trial[0])
                cpus.append(plain[1] / trial[1])
                print(f"  {name}, round {round_}: trial {trial[0]:.2f} s wall / {trial[1]:.2f} s CPU, "
                      f"plain loop {plain[0]:.2f} / {plain[1]:.2f}")
            print(f"{name}: trial speed vs plain loop {statistics.median(walls):.3f}x by wall time, "
                  f"{statistics.median(cpus):.3f}x by CPU time (median of {args.rounds}; goal >= 0.95x)")
            fresh = compose("sweep", [f"run_root={root}", f"study_name=dup{name[0]}", "n_trials=1", "pruner=none",
                                      "sampler=random", f"trainer.max_steps={args.steps}", f"threads={args.threads}"])
            trained, again = trial_run(fresh, ARCHS[name]), trial_run(fresh, ARCHS[name])
            print(f"{name}: a duplicate takes {again[0] / trained[0]:.4f}x a trained trial's wall time "
                  f"({again[0] * 1000:.0f} ms vs {trained[0]:.2f} s)")


if __name__ == "__main__":
    main()
