"""Syne Tune's strategies on our tabulated benchmark, through Syne Tune's own simulator backend.

The table becomes a ``BlackboxTabular`` (the configurations, both seeds, the validation loss
and elapsed seconds at each of the 12 validations as the fidelity), which Syne Tune's
``UserBlackboxBackend`` replays on simulated time with ``n_workers`` asynchronous workers
(a seed drawn per trial, as in our replay). Compute is counted as in
``search/study/replay.py``: each trial's tokens up to the last validation it reported,
and the incumbent is the trial that reached the last validation with the best loss,
judged by its configuration's table value. Needs ``pip install -e ".[bench]"``.

    python benchmarks/peers.py --table benchmarks/results/bench_table.json.gz --peer ASHA --seeds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import pathlib
import sys
import tempfile
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the Syne Tune baselines of the installed version (0.16) this compares, by name; its BORE
#: and ASHABORE fit a gradient-boosted classifier per decision (150 s for one 20-trial replay
#: here), too slow for hundreds of replays (DEHB and MOBSTER are not in this version)
PEERS = ("RandomSearch", "ASHA", "BOHB", "TPE", "REA")
MULTI_FIDELITY = ("ASHA", "BOHB")


def blackbox(table: Any) -> Any:
    """The table as Syne Tune's tabular blackbox: fidelity ``step`` is the validation's index (1-12)."""
    import pandas as pd
    from syne_tune.blackbox_repository.blackbox_tabular import BlackboxTabular
    from syne_tune.config_space import choice, randint

    entries = list(table.entries.values())
    names = sorted(entries[0].params)
    space = {name: choice(sorted({entry.params[name] for entry in entries})) for name in names}
    hyperparameters = pd.DataFrame([{name: entry.params[name] for name in names} for entry in entries])
    seeds = min(len(entry.runs) for entry in entries)
    values = np.zeros((len(entries), seeds, len(table.steps), 2))
    for i, entry in enumerate(entries):
        for s, run in enumerate(entry.runs[:seeds]):
            values[i, s, :, 0] = run.val_loss
            values[i, s, :, 1] = run.seconds
    return BlackboxTabular(hyperparameters, space, {"step": randint(1, len(table.steps))}, values,
                           fidelity_values=np.arange(1, len(table.steps) + 1), objectives_names=["val_loss", "elapsed_time"])


def scheduler(name: str, box: Any, seed: int) -> Any:
    from syne_tune.optimizer import baselines

    cls = getattr(baselines, name)
    if name in MULTI_FIDELITY:
        return cls(box.configuration_space, metric="val_loss", time_attr="step", max_t=len(box.fidelity_values),
                   do_minimize=True, random_seed=seed)
    if name == "RandomSearch":
        return cls(box.configuration_space, metrics=["val_loss"], do_minimize=True, random_seed=seed)
    return cls(box.configuration_space, metric="val_loss", do_minimize=True, random_seed=seed)


def run_peer(name: str, table: Any, workers: int = 1, seed: int = 0, budget_trials: float = 100.0) -> Any:
    """One replay of Syne Tune's ``name`` on ``table``; returns a :class:`~search.study.replay.Trace`."""
    from syne_tune import Tuner
    from syne_tune.backend.simulator_backend.simulator_callback import SimulatorCallback
    from syne_tune.blackbox_repository.simulated_tabular_backend import UserBlackboxBackend
    from syne_tune.tuner_callback import TunerCallback

    from qkvsearch.search.study.replay import Trace, config_key

    logging.getLogger("syne_tune").setLevel(logging.ERROR)
    np.random.seed(seed)  # the backend draws each trial's seed from numpy's global generator
    box = blackbox(table)
    budget = budget_trials * table.full_trial_tokens
    last = len(table.steps)

    class Accountant(TunerCallback):
        """Tokens per trial (its last validation), and the incumbent after each change."""

        def __init__(self) -> None:
            self.reached: dict[int, int] = {}
            self.flops_per_token: dict[int, int] = {}
            self.best: dict[int, float] = {}
            self.best_reported = math.inf
            self.curve: list[tuple[float, float, float, float]] = []
            self.trials = 0

        def tokens(self) -> float:
            return sum(table.steps[f - 1] * table.tokens_per_step for f in self.reached.values())

        def flops(self) -> float:
            return sum(3.0 * self.flops_per_token[t] * table.steps[f - 1] * table.tokens_per_step
                       for t, f in self.reached.items())

        def on_trial_result(self, trial: Any, status: str, result: dict, decision: str) -> None:
            entry = table.entries[config_key({k: trial.config[k] for k in box.configuration_space})]
            fidelity = int(result["step"])
            self.trials = max(self.trials, trial.trial_id + 1)
            self.reached[trial.trial_id] = max(self.reached.get(trial.trial_id, 0), fidelity)
            self.flops_per_token[trial.trial_id] = entry.flops_per_token
            self.best[trial.trial_id] = min(self.best.get(trial.trial_id, math.inf), float(result["val_loss"]))
            if fidelity == last and self.best[trial.trial_id] < self.best_reported:
                self.best_reported = self.best[trial.trial_id]
                self.curve.append((self.tokens(), self.flops(), float(result.get("st_tuner_time", 0.0)), entry.value))

    accountant = Accountant()
    backend = UserBlackboxBackend(box, elapsed_time_attr="elapsed_time")
    tuner = Tuner(trial_backend=backend, scheduler=scheduler(name, box, seed),
                  stop_criterion=lambda status: accountant.tokens() >= budget, n_workers=workers, sleep_time=0,
                  callbacks=[SimulatorCallback(), accountant], save_tuner=False, results_update_interval=1e9,
                  print_update_interval=1e9, tuner_name=f"qkv-{name.lower()}-{seed}")
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        os.environ["SYNETUNE_FOLDER"] = folder  # its results files, which this does not read
        tuner.run()
    complete = sum(f == last for f in accountant.reached.values())
    return Trace(accountant.curve, accountant.tokens(), accountant.trials, complete, accountant.trials - complete, 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "bench_table.json.gz")
    parser.add_argument("--peer", choices=PEERS, default="ASHA")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--budget", type=float, default=100.0, help="full trials' compute")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from qkvsearch.search.study.replay import Table

    table = Table.load(args.table)
    for seed in range(args.seeds):
        trace = run_peer(args.peer, table, args.workers, seed, args.budget)
        print(f"{args.peer} seed {seed}: {trace.trials} trials, {trace.complete} complete, regret "
              f"{trace.value_at(trace.tokens) - table.best_value:.4f} after {trace.tokens / table.full_trial_tokens:.1f} full trials")


if __name__ == "__main__":
    main()
