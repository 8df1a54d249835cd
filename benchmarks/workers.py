"""Trials per hour of `qkv sweep workers=2` against `workers=1` on this machine.

Each run is a real `qkv sweep` process (start-up, extra worker, study on SQLite, Fabric
trials) over a space whose samples all cost about the same per step (2 layers x 48, rotary or
learned positions and a sliding window's width the only choices, 126 architectures), so
the two settings do equal work per trial. Runs
alternate (ABBA); a trial that repeats an earlier architecture is not trained again, so the
rate counts trained trials.

Run: python benchmarks/workers.py [--trials 8] [--steps 150] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import optuna

SPACE = ["space.params.n_layers.low=2", "space.params.n_layers.high=2", "space.params.d_model.choices=[48]",
         "space.params.n_heads.choices=[2]", "space.params.positions.choices=[rotary,learned]",
         "space.params.scaling.choices=[sqrt_dk]", "space.params.mask.choices=[sliding_window]",
         "space.params.window.low=2", "space.params.window.high=64", "space.params.window.log=false",
         "space.params.ffn.choices=[gelu]", "space.params.ffn_mult.choices=[4]"]


def run(workers: int, trials: int, steps: int, root: str, name: str) -> tuple[float, int]:
    """Wall seconds of the sweep, and how many trials it trained."""
    args = [sys.executable, "-m", "qkvsearch.search.cli", "sweep", f"workers={workers}", "threads=1",
            f"n_trials={trials}", f"trainer.max_steps={steps}", "trainer.val_check_interval=50", "pruner=none",
            "sampler=random", f"study_name={name}", f"run_root={root}", "artifacts=null", *SPACE]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root}/studies.db")
    trained = [t for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    return seconds, len(trained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(args.rounds):
            for workers in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                seconds, trained = run(workers, args.trials, args.steps, root, f"w{workers}r{round_}")
                rates[workers].append(trained / seconds * 3600)
                print(f"round {round_}, workers={workers}: {trained} trials trained in {seconds:.1f} s "
                      f"({rates[workers][-1]:.0f} per hour)")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"{os.cpu_count()} cores: workers=2 trains {two / one:.2f}x the trials per hour of workers=1 "
          f"({two:.0f} vs {one:.0f}; median of {args.rounds}; goal >= 1.6x)")


if __name__ == "__main__":
    main()
