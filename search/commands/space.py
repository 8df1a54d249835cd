"""``qkv space show``: a space's parameters and, by sampling offline, how many samples are
feasible and how large they are."""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics

import optuna
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from qkvsearch.models import count_parameters, flops_per_token
from qkvsearch.search.study.prepare import build_space, build_task
from qkvsearch.search.trial.objective import random_draws
from qkvsearch.spaces import FunctionSpace, Infeasible, Space


@dataclasses.dataclass
class SampleStats:
    """What ``n`` random samples of a space came to."""

    n: int
    feasible: int
    reasons: collections.Counter
    n_params: list[int]
    flops: list[int]


def sample_space(space: Space | FunctionSpace, task, n: int, seed: int = 0) -> SampleStats:
    """Samples ``n`` random trials in memory and checks each as a sweep would."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stats = SampleStats(n, 0, collections.Counter(), [], [])
    for draw in random_draws(space, task, n, seed):
        if isinstance(draw, Infeasible):
            stats.reasons[_reason_kind(draw)] += 1
            continue
        stats.feasible += 1
        stats.n_params.append(count_parameters(draw))
        stats.flops.append(flops_per_token(draw))
    return stats


def _reason_kind(error: Infeasible) -> str:
    """The reason with its numbers blanked, so equal kinds of rejection count together."""
    return re.sub(r"\d[\d,.]*", "N", str(error).removeprefix("infeasible: "))[:160]


def _range(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{min(values):,} / {int(statistics.median(values)):,} / {max(values):,}"


def show(cfg: DictConfig, console: Console | None = None) -> SampleStats:
    console = console or Console()
    task = build_task(cfg)
    space = build_space(cfg, task)
    console.print(f"[bold]space {space.name}[/bold] for task {cfg.task.name}: {space.description}")
    table = Table("parameter", "distribution", "condition")
    for row in space.describe():
        table.add_row(*row)
    console.print(table)
    stats = sample_space(space, task, cfg.n_samples, cfg.seed)
    console.print(f"feasible: {stats.feasible} of {stats.n} random samples ({100 * stats.feasible / stats.n:.0f}%)")
    console.print(f"parameters (min / median / max): {_range(stats.n_params)}")
    console.print(f"FLOPs per token (min / median / max): {_range(stats.flops)}")
    for reason, count in stats.reasons.most_common(5):
        console.print(f"  rejected {count}x: {reason}")
    return stats
