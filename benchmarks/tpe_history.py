"""What one TPE suggestion costs as the study grows, with and without the bounded history.

A few dozen trials are made by the sweep's real trial path (the space's sampling, an
objective that trains nothing: ``coordination.NoTraining``) and copied into in-memory
studies of each size, so the figures are the sampler's own work, not the storage's. For
each size the bounded sampler (conf/sampler/tpe.yaml, ``max_history``) and Optuna's
unbounded TPE (``sampler.max_history=null``) sample the same space in turn, interleaved,
and the median seconds per suggestion and their ratio are printed.

    python benchmarks/tpe_history.py [--sizes 1000 3000 10000] [--space tiny] [--suggestions 6]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import coordination  # noqa: E402  (the fill and the no-training objective)
import optuna  # noqa: E402

from qkvsearch.search.study.prepare import build_sampler  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.ERROR)


def worker_for(where: pathlib.Path, space: str, *extra: str):
    """The worker a sweep would run (its objective samples the space) and its config."""
    overrides = [*coordination.overrides_for("sqlite", where, None, space, f"tpe-{space}", 10**6), *extra]
    cfg = coordination.compose_config("sweep", overrides)
    return coordination.prepare(cfg).worker, cfg


def study_of(n: int, templates: list, directions, sampler) -> optuna.Study:
    study = optuna.create_study(directions=directions, sampler=sampler)
    study.add_trials(coordination.copies_of(templates, n))
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--suggestions", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = pathlib.Path(tmp)
        coordination.fill(coordination.overrides_for("sqlite", where, None, args.space, f"tpe-{args.space}", 10**6), 48)
        bounded, unbounded = worker_for(where, args.space), worker_for(where, args.space, "sampler.max_history=null")
        templates = [t for t in bounded[0].study.get_trials(deepcopy=False) if t.state.is_finished()]
        directions = bounded[0].study.directions
        print(f"space {args.space}, {len(templates)} template trials; seconds per suggestion (median)")
        print("trials   bounded   unbounded   unbounded / bounded")
        for n in args.sizes:
            # a fresh sampler per study, as each worker of a sweep has
            pairs = [(worker, study_of(n, templates, directions, build_sampler(cfg, None, 0)))
                     for worker, cfg in (bounded, unbounded)]
            times: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(args.suggestions):
                for index, (worker, study) in enumerate(pairs):
                    start = time.perf_counter()
                    trial = study.ask()
                    try:
                        worker.objective.sample(trial)
                    except Exception:  # noqa: BLE001 (an infeasible draw still cost its sampling)
                        pass
                    times[index].append(time.perf_counter() - start)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            b, u = (statistics.median(times[i][1:]) for i in (0, 1))  # the first warms the caches
            print(f"{n:>6}   {b:7.3f}   {u:9.3f}   {u / b:8.1f}")


if __name__ == "__main__":
    main()
