"""Builds the tabulated search benchmark: every configuration of the ``bench`` space trained
in full, with its whole learning curve, once per training seed.

Each seed is one real ``qkv sweep`` (``space=bench sampler=grid pruner=none``): the grid
sampler visits every configuration once, each trial trains for the full budget without
pruning and records its validation loss at every validation (Optuna's intermediate
values), the seconds at each (``seconds_at``), its tokens and FLOPs per token. The sweeps
are the checkpoint: running ``build`` again resumes each study where it stopped (a trial
cut short by a kill is retried). ``export`` reads the studies into one compact table,
``benchmarks/results/bench_table.json.gz``, with the command, machine and date.

    python benchmarks/build_table.py build             # 648 configurations x 2 seeds, both seeds at once
    python benchmarks/build_table.py export            # the table from whatever has finished
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "bench_table.json.gz"
#: the budget of a full trial in the table, and how often it validates
TRAINER = ["trainer.max_steps=300", "trainer.val_check_interval=25", "trainer.limit_val_batches=8",
           "trainer.log_every_n_steps=25"]
SWEEP = ["space=bench", "sampler=grid", "pruner=none", "finalists=0", "artifacts=null", "threads=1"]


def grid_size() -> int:
    """How many configurations the bench space holds (its grid)."""
    from qkvsearch.search.base.configs import compose_config
    from qkvsearch.search.study.prepare import build_space, build_task, grid_of

    cfg = compose_config("sweep", ["space=bench"])
    grid = grid_of(build_space(cfg, build_task(cfg)))
    size = 1
    for values in grid.values():
        size *= len(values)
    return size


def sweep_command(seed: int, run_root: pathlib.Path, n_trials: int) -> list[str]:
    return [sys.executable, "-m", "qkvsearch.search.cli", "sweep", *SWEEP, *TRAINER, f"seed={seed}",
            f"study_name=bench-s{seed}", f"run_root={run_root}", f"n_trials={n_trials}"]


def build(seeds: list[int], run_root: pathlib.Path) -> None:
    """Runs (or resumes) one sweep per seed, all at once, each with one thread; waits for all."""
    n = grid_size()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    run_root.mkdir(parents=True, exist_ok=True)
    procs = []
    for seed in seeds:
        log = open(run_root / f"build-s{seed}.log", "a")  # noqa: SIM115 - open while the sweep runs
        procs.append((seed, subprocess.Popen(sweep_command(seed, run_root, n), stdout=log, stderr=subprocess.STDOUT,
                                             env=env, cwd=ROOT)))
        print(f"seed {seed}: {' '.join(sweep_command(seed, run_root, n)[2:])} (log {log.name})", flush=True)
    failed = [seed for seed, proc in procs if proc.wait() != 0]
    if failed:
        raise SystemExit(f"the sweeps of seeds {failed} failed; see their logs in {run_root}")


def machine() -> str:
    """The CPU model and core count, or the GPU, this table was measured on."""
    name = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def export(seeds: list[int], run_root: pathlib.Path, out: pathlib.Path = TABLE) -> dict[str, Any]:
    """Reads the seeds' studies into the table (configurations with at least one complete run)."""
    import optuna
    import torch

    from qkvsearch.search.base.configs import compose_config
    from qkvsearch.search.study.prepare import build_task
    from qkvsearch.tasks.base import check_task

    sizes = check_task(build_task(compose_config("sweep", ["space=bench"])), "lm_stdlib")
    storage = f"sqlite:///{run_root}/studies.db"
    configs: dict[str, dict[str, Any]] = {}
    steps: list[int] = []
    tokens_per_step = None
    names: list[str] = []
    for seed in seeds:
        study = optuna.load_study(study_name=f"bench-s{seed}", storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if "duplicate_of" in trial.user_attrs:
                continue
            names = names or sorted(trial.params)
            key = json.dumps({k: trial.params[k] for k in sorted(trial.params)})
            curve = sorted(trial.intermediate_values.items())
            steps = steps or [s for s, _ in curve]
            if [s for s, _ in curve] != steps:
                continue  # a run of another budget: not comparable
            tokens_per_step = tokens_per_step or trial.user_attrs["train_tokens"] // steps[-1]
            seconds = trial.user_attrs.get("seconds_at", {})
            entry = configs.setdefault(key, {"params": json.loads(key), "n_params": trial.user_attrs["n_params"],
                                             "flops_per_token": trial.user_attrs["flops_per_token"], "runs": []})
            entry["runs"].append({"seed": seed, "trial": trial.number, "val_loss": [round(v, 5) for _, v in curve],
                                  "seconds": [seconds.get(str(s)) for s in steps]})
    table = {
        "space": "bench", "params": names, "steps": steps, "tokens_per_step": tokens_per_step,
        "task": dataclasses.asdict(sizes),
        "built": {"command": "python benchmarks/build_table.py build --seeds " + " ".join(map(str, seeds)),
                  "sweep": " ".join(SWEEP + TRAINER), "machine": machine(), "torch": torch.__version__,
                  "exported": datetime.date.today().isoformat(), "seeds": seeds},
        "configs": sorted(configs.values(), key=lambda c: json.dumps(c["params"])),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt") as handle:
        json.dump(table, handle, separators=(",", ":"))
    runs = sum(len(c["runs"]) for c in table["configs"])
    print(f"{out}: {len(table['configs'])} configurations, {runs} runs, {out.stat().st_size / 1024:.0f} KiB")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "export"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--run-root", type=pathlib.Path, default=ROOT / "runs" / "tabulate")
    parser.add_argument("--out", type=pathlib.Path, default=TABLE)
    args = parser.parse_args()
    if args.action == "build":
        build(args.seeds, args.run_root.resolve())
    export(args.seeds, args.run_root.resolve(), args.out)


if __name__ == "__main__":
    main()
