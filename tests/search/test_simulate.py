"""benchmarks/simulate.py: replays appended and resumed, and the figures read back from them."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import statistics
import sys

import pytest

from tests.search.tables import write_table

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_simulate():
    spec = importlib.util.spec_from_file_location("simulate", ROOT / "benchmarks" / "simulate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate"] = module  # its pool's processes find the replay function by this name
    spec.loader.exec_module(module)
    return module


def test_the_lower_median_counts_never_as_last_and_a_ratio_over_never_is_undefined():
    import numpy as np

    simulate = load_simulate()
    rng = np.random.default_rng(0)
    assert simulate.lower_median(np.array([1.0, 2.0, math.inf, math.inf])) == 2.0  # half got there by 2
    assert math.isinf(simulate.lower_median(np.array([1.0, math.inf, math.inf])))
    point, low, high = simulate.ratio_interval([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], rng)
    assert point == low == high == 0.5
    assert math.isnan(simulate.ratio_interval([1.0], [math.inf], rng)[0])


def test_the_anytime_curve_read_at_many_points_is_the_incumbent_at_each():
    import numpy as np

    simulate = load_simulate()
    rng = np.random.default_rng(1)
    tokens = np.cumsum(rng.integers(1, 50, size=30)).astype(float)
    curve = [[t, 0.0, 0.0, v] for t, v in zip(tokens, np.minimum.accumulate(rng.random(30) + 2), strict=True)]
    points = np.concatenate([[0.0, tokens[0] - 1], tokens, tokens + 0.5, rng.uniform(0, tokens[-1] * 1.2, 200)])
    assert simulate.values_at(curve, points).tolist() == [simulate.value_at(curve, x) for x in points]


@pytest.mark.slow
def test_replays_resume_and_the_report_reads_them(tmp_path):
    simulate = load_simulate()
    table_path = tmp_path / "t.json.gz"
    write_table(table_path, lambda i, k, s: 2.0 + (i * 7919 % 648) / 648 + 1.0 / (1 + k) + 0.01 * s)
    results = tmp_path / "replays.jsonl"
    args = ["--table", str(table_path), "--results", str(results), "--budget", "10", "--processes", "1"]
    simulate.main(["run", "--strategies", "random", "tpe+sha", "--replays", "3", *args])
    simulate.main(["run", "--strategies", "random", "tpe+sha", "--replays", "4", *args])  # resumes: one more each
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["strategy"], r["seed"]) for r in records) == sorted(
        (s, seed) for s in ("random", "tpe+sha") for seed in range(4))
    summary = simulate.main(["report", *args, "--out", str(tmp_path / "sim")])
    finals = [simulate.value_at(r["curve"], 10 * 300 * 2048) for r in records if r["strategy"] == "random"]
    assert summary["target"] == statistics.median(finals)
    row = next(r for r in summary["rows"] if r["strategy"] == "random")
    assert row["tokens_ratio"][0] == 1.0 and row["tokens_reached"] >= 2  # half of random reaches its own median
    assert (tmp_path / "sim.md").read_text().count("| random | 1 | 4 |") == 1
    assert (tmp_path / "sim-k1.png").stat().st_size > 10_000
