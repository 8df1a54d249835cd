"""Does the search pay? Strategies replayed hundreds of times on the tabulated benchmark.

Each strategy (a sampler and a pruner by their config names, optionally with overrides of
their own: ``tpe+sha``, ``tpe+hyperband:sampler.n_startup_trials=10``; or a Syne Tune
baseline: ``syne:ASHA``) is replayed on ``benchmarks/results/bench_table.json.gz`` with k
asynchronous workers, once per seed, until 100 full trials' compute is spent
(``search/study/replay.py``; Syne Tune's through its own simulator, ``benchmarks/peers.py``).
Replays are appended to a JSON-lines file as they finish, so a run that is stopped resumes.

Figures (``--report``), per strategy and k, over the replays: the compute (tokens and
FLOPs) spent when the incumbent first reached random search's median final value, as the
median with a 95% bootstrap interval and as a ratio to random search's; the regret (the
incumbent's table value minus the table's best) after 10, 30 and 100 full trials' compute;
an anytime plot (regret against tokens, median and quartile band); and how well each
validation step ranks the final values on the table (Spearman and Kendall).

    python benchmarks/simulate.py run --strategies random tpe+hyperband --workers 1 4 16 --replays 200
    python benchmarks/simulate.py report
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import pathlib
import statistics
import sys
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
TABLE = ROOT / "benchmarks" / "results" / "bench_table.json.gz"
RESULTS = ROOT / "benchmarks" / "results" / "replays.jsonl"
BUDGETS = (10, 30, 100)  # full trials' compute


def strategy_overrides(strategy: str) -> list[str]:
    """``sampler+pruner``, optionally ``:key=value,key=value`` with overrides of their own."""
    choice, _, own = strategy.partition(":")
    sampler, _, pruner = choice.partition("+")
    return [f"sampler={sampler}", f"pruner={pruner or 'none'}", *(o for o in own.split(",") if o)]


def strategy_config(strategy: str, table: Any) -> Any:
    """The sweep config a strategy replays with: the table's space and steps, and the strategy."""
    from qkvsearch.search.base.configs import compose_config

    every = table.steps[1] - table.steps[0]
    return compose_config("sweep", ["space=bench", f"trainer.max_steps={table.steps[-1]}",
                                    f"trainer.val_check_interval={every}", *strategy_overrides(strategy)])


def one_replay(job: tuple[str, int, int, str, float]) -> dict[str, Any]:
    """Runs one replay in a worker process; returns its record."""
    strategy, workers, seed, table_path, budget = job
    import torch

    torch.set_num_threads(1)
    from qkvsearch.search.study.replay import Table, replay

    table = Table.load(table_path)
    began = time.perf_counter()
    if strategy.startswith("syne:"):
        from peers import run_peer

        trace = run_peer(strategy.removeprefix("syne:"), table, workers, seed, budget)
    else:
        trace = replay(strategy_config(strategy, table), table, workers=workers, seed=seed, budget_trials=budget)
    return {"strategy": strategy, "workers": workers, "seed": seed, "budget": budget, "curve": trace.curve,
            "tokens": trace.tokens, "trials": trace.trials, "complete": trace.complete, "pruned": trace.pruned,
            "duplicates": trace.duplicates, "seconds": time.perf_counter() - began}


def done(path: pathlib.Path) -> set[tuple[str, int, int]]:
    if not path.exists():
        return set()
    return {(r["strategy"], r["workers"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def run(strategies: list[str], workers: list[int], replays: int, table: pathlib.Path, out: pathlib.Path,
        budget: float, processes: int) -> None:
    """Runs every replay not yet in ``out``, ``processes`` at a time, appending each as it ends."""
    have = done(out)
    jobs = [(s, k, seed, str(table), budget) for s in strategies for k in workers for seed in range(replays)
            if (s, k, seed) not in have]
    print(f"{len(jobs)} replays to run ({len(have)} already in {out})", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool, open(out, "a") as handle:
        for i, record in enumerate(pool.imap_unordered(one_replay, jobs), 1):
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            if i % 50 == 0 or i == len(jobs):
                print(f"  {i}/{len(jobs)} replays, {time.perf_counter() - began:.0f} s", flush=True)


# --- figures -----------------------------------------------------------------------------


def value_at(curve: list, tokens: float) -> float:
    value = math.inf
    for point in curve:
        if point[0] > tokens:
            break
        value = point[3]
    return value


def values_at(curve: list, tokens: np.ndarray) -> np.ndarray:
    """:func:`value_at` at many compute points at once."""
    points = np.asarray(curve, dtype=float).reshape(-1, 4)
    index = np.searchsorted(points[:, 0], tokens, side="right") - 1
    return np.where(index >= 0, points[np.maximum(index, 0), 3], np.inf)


def compute_to(curve: list, target: float, weight: int) -> float:
    return next((point[weight] for point in curve if point[3] <= target), math.inf)


def lower_median(data: np.ndarray, axis: int | None = None) -> np.ndarray:
    """The lower median (a value of the data, never an average): with inf for 'never', the
    compute by which half the replays had got there. The target is random search's median
    final value, which at least half of its replays reach, so its own lower median is finite."""
    return np.quantile(data, 0.5, axis=axis, method="inverted_cdf")


def median_interval(values: list[float], rng: np.random.Generator, rounds: int = 2000) -> tuple[float, float, float]:
    """The lower median and a 95% bootstrap interval (inf, never reached, sorts last)."""
    data = np.array(values, dtype=float)
    medians = lower_median(rng.choice(data, size=(rounds, len(data)), replace=True), axis=1)
    return float(lower_median(data)), float(np.quantile(medians, 0.025, method="inverted_cdf")), float(np.quantile(medians, 0.975, method="inverted_cdf"))


def ratio_interval(own: list[float], base: list[float], rng: np.random.Generator,
                   rounds: int = 2000) -> tuple[float, float, float]:
    """Ratio of lower medians, and its 95% bootstrap interval (both resampled); inf where the
    strategy's median never got there, nan where random search's did not (no ratio)."""
    a, b = np.array(own, dtype=float), np.array(base, dtype=float)

    def ratio(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(np.isfinite(y), x / y, np.nan)

    ratios = ratio(lower_median(rng.choice(a, size=(rounds, len(a))), axis=1),
                   lower_median(rng.choice(b, size=(rounds, len(b))), axis=1))
    point = float(ratio(lower_median(a), lower_median(b)))
    return point, float(np.nanquantile(ratios, 0.025, method="inverted_cdf")), float(np.nanquantile(ratios, 0.975, method="inverted_cdf"))


def rung_trust(table: Any) -> list[dict[str, Any]]:
    """How well each validation step's loss ranks the runs' final (best) losses, over every run
    of the table; and, last, how well one seed's final ranks the other's (the noise ceiling)."""
    from scipy import stats

    runs = [run for entry in table.entries.values() for run in entry.runs]
    finals = [min(run.val_loss) for run in runs]
    rows = []
    for k, step in enumerate(table.steps):
        at = [run.val_loss[k] for run in runs]
        rows.append({"predictor": f"step {step}", "spearman": float(stats.spearmanr(at, finals).statistic),
                     "kendall": float(stats.kendalltau(at, finals).statistic)})
    pairs = [(min(e.runs[0].val_loss), min(e.runs[1].val_loss)) for e in table.entries.values() if len(e.runs) > 1]
    if pairs:
        a, b = zip(*pairs, strict=True)
        rows.append({"predictor": "another seed's final", "spearman": float(stats.spearmanr(a, b).statistic),
                     "kendall": float(stats.kendalltau(a, b).statistic)})
    return rows


def summarize(records: list[dict[str, Any]], table: Any, baseline: str = "random") -> dict[str, Any]:
    """The report's figures from the replays' records."""
    rng = np.random.default_rng(0)
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["strategy"], record["workers"]), []).append(record)
    full = table.full_trial_tokens
    base = groups[(baseline, 1)]
    target = statistics.median(value_at(r["curve"], r["budget"] * full) for r in base)
    base_needed = {w: [compute_to(r["curve"], target, w) for r in base] for w in (0, 1)}
    rows = []
    for (strategy, workers), group in sorted(groups.items()):
        row: dict[str, Any] = {"strategy": strategy, "workers": workers, "replays": len(group)}
        for w, name in ((0, "tokens"), (1, "flops")):
            needed = [compute_to(r["curve"], target, w) for r in group]
            row[name] = median_interval(needed, rng)
            row[f"{name}_ratio"] = ratio_interval(needed, base_needed[w], rng)
            row[f"{name}_reached"] = sum(math.isfinite(n) for n in needed)
        for budget in BUDGETS:
            row[f"regret_{budget}"] = median_interval([value_at(r["curve"], budget * full) - table.best_value
                                                       for r in group], rng)
        row["trials"] = statistics.median(r["trials"] for r in group)
        row["pruned"] = statistics.median(r["pruned"] for r in group)
        row["seconds_per_replay"] = statistics.median(r["seconds"] for r in group)
        rows.append(row)
    return {"target": target, "best": table.best_value, "baseline": baseline, "rows": rows, "trust": rung_trust(table),
            "table": table.built}


def _fmt(interval: tuple[float, float, float], scale: float = 1.0, digits: int = 2) -> str:
    point, low, high = (x / scale for x in interval)
    text = lambda x: "-" if math.isnan(x) else "never" if not math.isfinite(x) else f"{x:.{digits}f}"  # noqa: E731
    return f"{text(point)} [{text(low)}, {text(high)}]"


def markdown(summary: dict[str, Any], full: int) -> str:
    """The report as Markdown tables (compute in full trials' tokens)."""
    lines = [f"Target: random search's median final incumbent value, {summary['target']:.4f} (table best "
             f"{summary['best']:.4f}). Compute in full trials ({full:,} tokens each); [95% bootstrap interval].", "",
             "| strategy | k | replays | reached | compute to target | vs random (tokens) | vs random (FLOPs) | "
             "regret @10 | regret @30 | regret @100 | trials | pruned |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary["rows"]:
        lines.append(
            f"| {row['strategy']} | {row['workers']} | {row['replays']} | {row['tokens_reached']}/{row['replays']} | "
            f"{_fmt(row['tokens'], full, 1)} | {_fmt(row['tokens_ratio'])} | {_fmt(row['flops_ratio'])} | "
            f"{_fmt(row['regret_10'], 1, 3)} | {_fmt(row['regret_30'], 1, 3)} | {_fmt(row['regret_100'], 1, 3)} | "
            f"{row['trials']:.0f} | {row['pruned']:.0f} |")
    lines += ["", "| predictor of the final loss | Spearman | Kendall |", "| --- | --- | --- |"]
    lines += [f"| {r['predictor']} | {r['spearman']:.3f} | {r['kendall']:.3f} |" for r in summary["trust"]]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], table: Any, workers: int, path: pathlib.Path, only: list[str]) -> None:
    """Regret against compute, median and quartile band per strategy, for ``workers`` workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = table.full_trial_tokens
    grid = np.linspace(1, max(r["budget"] for r in records), 200)
    figure, axis = plt.subplots(figsize=(8, 5))
    for strategy in only:
        group = [r for r in records if r["strategy"] == strategy and r["workers"] == workers]
        if not group:
            continue
        regrets = np.array([values_at(r["curve"], grid * full) - table.best_value for r in group])
        regrets = np.where(np.isfinite(regrets), regrets, np.nan)
        median = np.nanmedian(regrets, axis=0)
        axis.plot(grid, median, label=f"{strategy} ({len(group)} replays)")
        axis.fill_between(grid, np.nanquantile(regrets, 0.25, axis=0), np.nanquantile(regrets, 0.75, axis=0), alpha=0.2)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("compute spent (full trials' tokens)")
    axis.set_ylabel("regret of the incumbent (nats per character)")
    axis.set_title(f"the bench table, {workers} worker{'s' if workers > 1 else ''}: median and quartiles over replays")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(table_path: pathlib.Path, results: pathlib.Path, out: pathlib.Path, plotted: list[str]) -> dict[str, Any]:
    from qkvsearch.search.study.replay import Table

    table = Table.load(table_path)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    summary = summarize(records, table)
    text = markdown(summary, table.full_trial_tokens)
    print(text)
    (out.with_suffix(".md")).write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(summary, indent=1))
    for workers in sorted({r["workers"] for r in records}):
        plot(records, table, workers, out.with_name(f"{out.name}-k{workers}.png"),
             plotted or sorted({r["strategy"] for r in records}))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--strategies", nargs="+", default=["random", "tpe+hyperband"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--budget", type=float, default=100.0, help="full trials' compute per replay")
    parser.add_argument("--table", type=pathlib.Path, default=TABLE)
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "simulate")
    parser.add_argument("--plot", nargs="*", default=[], help="strategies to draw (default: all)")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.action == "run":
        run(args.strategies, args.workers, args.replays, args.table, args.results, args.budget, args.processes)
        return None
    return report(args.table, args.results, args.out, args.plot)


if __name__ == "__main__":
    main()
