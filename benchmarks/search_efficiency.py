"""Does the search pay? Compute each strategy needs to reach random search's median best.

Strategies (a sampler and a pruner by their config names: ``random``, ``tpe+hyperband``,
``tpe+median``, ``random+hyperband``, ``gp+sha``, ...) each run one real sweep per seed on
the same task and space. Compute is counted in training tokens the trials actually
trained: a pruned trial up to its last step, a duplicate architecture (not trained again)
and an infeasible sample at zero; and FLOP-weighted, as 3 x forward FLOPs per token x
tokens (forward and backward). Each strategy's runs give the best validation loss found
after each trial (trials in the order they ran, one worker). The target is the median,
over seeds, of random search's best at the end of its trials. The table gives, per
strategy, the median and quartiles over seeds of the compute spent when the best so far
first reached the target ("never" where it did not), and its ratio to random search's.
Strategies with a pruner run ``--pruned-factor`` times as many trials, since each costs
less; the plot shows best validation loss against compute, median and quartile band per
strategy.

    python benchmarks/search_efficiency.py --quick            # this 2-core CPU, ~15 min
    python benchmarks/search_efficiency.py                    # the defaults' task and space (a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import pathlib
import re
import statistics
import sys
import tempfile
import textwrap
import time
from typing import Any

import numpy as np
import optuna

ROOT = pathlib.Path(__file__).resolve().parents[1]
STRATEGIES = ["random", "tpe+hyperband", "tpe+median", "random+hyperband"]
#: --quick: shorter trials and (unless --override names a task) a smaller lm_stdlib, for a 2-core CPU
QUICK_TRAINER = ["trainer.max_steps=200", "trainer.val_check_interval=25", "trainer.limit_val_batches=4"]
QUICK_TASK = ["task.data.train_chars=200000", "task.data.val_chars=20000", "task.data.test_chars=20000"]


@dataclasses.dataclass
class TrialCost:
    """One trial as the benchmark counts it."""

    number: int
    state: str
    value: float | None  # the first objective of a complete trial
    tokens: int  # trained: 0 for a duplicate or an infeasible sample
    flops: float  # 3 x forward FLOPs per token x tokens
    note: str  # "duplicate", "infeasible" or ""


def trial_costs(study: optuna.Study) -> list[TrialCost]:
    """The study's trials in the order they ran, with the compute each spent."""
    costs = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        reason = str(t.user_attrs.get("pruned_reason", ""))
        note = "duplicate" if "duplicate_of" in t.user_attrs else "infeasible" if reason.startswith("infeasible") else ""
        tokens = 0 if note else int(t.user_attrs.get("train_tokens", 0))
        value = t.values[0] if t.state == optuna.trial.TrialState.COMPLETE else None
        costs.append(TrialCost(t.number, t.state.name, value, tokens,
                               3.0 * float(t.user_attrs.get("flops_per_token", 0)) * tokens, note))
    return costs


def best_curve(costs: list[TrialCost], weight: str) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative compute (``tokens`` or ``flops``) after each trial, and the best value so far."""
    spent, best, xs, ys = 0.0, math.inf, [], []
    for cost in costs:
        spent += getattr(cost, weight)
        if cost.value is not None:
            best = min(best, cost.value)
        xs.append(spent)
        ys.append(best)
    return np.array(xs), np.array(ys)


def compute_to_reach(costs: list[TrialCost], target: float, weight: str) -> float:
    """Compute spent when the best so far first reached ``target`` (inf: never)."""
    xs, ys = best_curve(costs, weight)
    reached = np.nonzero(ys <= target)[0]
    return float(xs[reached[0]]) if len(reached) else math.inf


def strategy_overrides(strategy: str) -> list[str]:
    """``sampler+pruner``, optionally ``:key=value,key=value`` with overrides of their own
    (``tpe+hyperband:pruner.min_resource=50``)."""
    choice, _, own = strategy.partition(":")
    sampler, _, pruner = choice.partition("+")
    return [f"sampler={sampler}", f"pruner={pruner or 'none'}", *(o for o in own.split(",") if o)]


def has_pruner(strategy: str) -> bool:
    return strategy.partition(":")[0].partition("+")[2] not in ("", "none")


def run_sweep(strategy: str, seed: int, n_trials: int, extra: list[str],
              root: pathlib.Path) -> tuple[list[TrialCost], dict[str, float]]:
    """One sweep, in this process, on its own SQLite study (the search alone: no finalists);
    returns its trials' costs and its proxy trust (Spearman rho of each validation step and
    proxy with the final loss)."""
    from qkvsearch.search.base.configs import compose_config
    from qkvsearch.search.inspect.trust import proxy_trust
    from qkvsearch.search.study.sweep import sweep

    name = re.sub(r"[^A-Za-z0-9_-]+", "-", strategy) + f"-s{seed}"
    cfg = compose_config("sweep", [*strategy_overrides(strategy), f"seed={seed}", f"n_trials={n_trials}",
                                   f"study_name={name}", f"run_root={root}", "artifacts=null", "finalists=0", *extra])
    with contextlib.redirect_stdout(io.StringIO()):
        study = sweep(cfg)
    return trial_costs(study), {r.predictor: r.spearman for r in proxy_trust(study)}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Median and quartiles (inf counts as the largest value)."""
    ordered = sorted(values)
    return tuple(float(np.quantile(np.array(ordered), q, method="lower" if math.inf in ordered else "linear"))
                 for q in (0.5, 0.25, 0.75))  # type: ignore[return-value]


def summarize(runs: dict[str, list[list[TrialCost]]], baseline: str = "random") -> dict[str, Any]:
    """The target and, per strategy and weight, the compute to reach it over seeds."""
    finals = [min((c.value for c in costs if c.value is not None), default=math.inf) for costs in runs[baseline]]
    target = statistics.median(finals)
    table: dict[str, Any] = {"target": target, "baseline": baseline, "strategies": {}}
    for strategy, seeds in runs.items():
        row: dict[str, Any] = {"seeds": len(seeds)}
        for weight in ("tokens", "flops"):
            needed = [compute_to_reach(costs, target, weight) for costs in seeds]
            row[weight] = {"needed": needed, "median_q1_q3": quartiles(needed),
                           "reached": sum(math.isfinite(n) for n in needed)}
        row["best"] = [min((c.value for c in costs if c.value is not None), default=math.inf) for costs in seeds]
        row["total_tokens"] = [sum(c.tokens for c in costs) for costs in seeds]
        table["strategies"][strategy] = row
    base = table["strategies"][baseline]
    for row in table["strategies"].values():
        for weight in ("tokens", "flops"):
            own, theirs = row[weight]["median_q1_q3"][0], base[weight]["median_q1_q3"][0]
            row[weight]["ratio"] = own / theirs if math.isfinite(own) and math.isfinite(theirs) and theirs else math.inf
    return table


def _fmt(x: float, unit: str) -> str:
    if not math.isfinite(x):
        return "never"
    return f"{x / 1e6:.2f} M" if unit == "tokens" else f"{x / 1e12:.3f} T"


def print_table(table: dict[str, Any]) -> None:
    print(f"target: random search's median best val_loss {table['target']:.4f}")
    print(f"{'strategy':<20} {'seeds':>5} {'reached':>7} {'tokens: median [q1, q3]':>30} {'ratio':>6} "
          f"{'FLOPs: median':>14} {'ratio':>6} {'best (median)':>14}")
    for strategy, row in table["strategies"].items():
        t, f = row["tokens"], row["flops"]
        med, q1, q3 = t["median_q1_q3"]
        print(f"{strategy:<20} {row['seeds']:>5} {t['reached']:>4}/{row['seeds']:<2} "
              f"{_fmt(med, 'tokens') + ' [' + _fmt(q1, 'tokens') + ', ' + _fmt(q3, 'tokens') + ']':>30} "
              f"{t['ratio']:>6.2f} {_fmt(f['median_q1_q3'][0], 'flops'):>14} {f['ratio']:>6.2f} "
              f"{statistics.median(row['best']):>14.4f}")


def print_trust(trust: dict[str, list[dict[str, float]]]) -> None:
    """Median over seeds of each predictor's Spearman rho with the final loss (random search's
    trials all run to the end, so its rows see every architecture it drew)."""
    for strategy, rows in trust.items():
        names = list(dict.fromkeys(name for row in rows for name in row))
        cells = []
        for name in names:
            values = [row[name] for row in rows if name in row and row[name] == row[name]]
            if values:
                cells.append(f"{name} {statistics.median(values):+.2f}")
        print(f"proxy trust ({strategy}, Spearman with the final loss, median over seeds): {', '.join(cells)}")


def plot(runs: dict[str, list[list[TrialCost]]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, seeds in runs.items():
        curves = [best_curve(costs, "tokens") for costs in seeds]
        end = max(xs[-1] for xs, _ in curves)
        grid = np.linspace(0, end, 200)
        values = []
        for xs, ys in curves:  # the best so far at each compute level (inf before the first complete trial)
            index = np.searchsorted(xs, grid, side="right") - 1
            values.append(np.where(index >= 0, ys[np.clip(index, 0, None)], np.inf))
        stacked = np.array(values)
        finite = np.isfinite(stacked).all(axis=0)
        with np.errstate(invalid="ignore"):  # inf before a seed's first complete trial: not drawn
            median = np.median(stacked, axis=0)
            q1, q3 = np.quantile(stacked, 0.25, axis=0), np.quantile(stacked, 0.75, axis=0)
        line, = ax.plot(grid[finite] / 1e6, median[finite], label=strategy)
        ax.fill_between(grid[finite] / 1e6, q1[finite], q3[finite], alpha=0.2, color=line.get_color())
    ax.set_xlabel("training tokens spent (millions)")
    ax.set_ylabel("best validation loss so far")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=12, help="trials of a strategy without a pruner")
    parser.add_argument("--pruned-factor", type=float, default=2.0, help="times as many trials with a pruner")
    parser.add_argument("--quick", action="store_true", help="a smaller task and shorter trials (a 2-core CPU)")
    parser.add_argument("--override", nargs="*", default=[], help="more sweep overrides (task=..., space=...)")
    parser.add_argument("--reuse", help="an earlier run's .json: its strategies' runs are read, not run again "
                        "(same settings only)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search_efficiency"))
    args = parser.parse_args(argv)
    if "random" not in args.strategies:
        parser.error("--strategies must include random (the baseline)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    own_task = any(o.startswith("task=") for o in args.override)
    extra = [*(QUICK_TRAINER + ([] if own_task else QUICK_TASK) if args.quick else []), *args.override]
    runs: dict[str, list[list[TrialCost]]] = {}
    trust: dict[str, list[dict[str, float]]] = {strategy: [] for strategy in args.strategies}
    settings = (f"{'--quick ' if args.quick else ''}{args.seeds} seeds, {args.trials} trials "
                f"(x{args.pruned_factor:g} pruned), {' '.join(extra) or 'defaults'}")
    earlier: dict[str, Any] = {}
    if args.reuse:
        earlier = json.loads(pathlib.Path(args.reuse).read_text())
        if earlier["settings"] != settings:
            parser.error(f"--reuse: {args.reuse} ran with {earlier['settings']!r}, not {settings!r}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.seeds):  # seeds outermost: a cut-short run still compares every strategy
            for strategy in args.strategies:
                if strategy in earlier.get("runs", {}):
                    runs.setdefault(strategy, []).append([TrialCost(**c) for c in earlier["runs"][strategy][seed]])
                    trust[strategy] += earlier.get("trust", {}).get(strategy, [])[seed : seed + 1]
                    continue
                n = round(args.trials * args.pruned_factor) if has_pruner(strategy) else args.trials
                costs, agreement = run_sweep(strategy, seed, n, extra, pathlib.Path(scratch))
                runs.setdefault(strategy, []).append(costs)
                trust[strategy].append(agreement)
                print(f"  {strategy} seed {seed}: {n} trials, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = summarize(runs)
    print(f"search efficiency: {settings}; {time.perf_counter() - start:.0f} s")
    print_table(table)
    print_trust(trust)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"settings": settings, "table": table, "trust": trust, "runs": {s: [[dataclasses.asdict(c) for c in costs] for costs in seeds]
                                                         for s, seeds in runs.items()}}, indent=1, default=str))
    plot(runs, out.with_suffix(".png"), f"qkvsearch search efficiency, {time.strftime('%Y-%m-%d')}: {settings}")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return {"table": table, "runs": runs}


if __name__ == "__main__":
    main()
