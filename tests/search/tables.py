"""Synthetic tabulated benchmarks over the real `bench` space, for the replay's tests."""

from __future__ import annotations

import gzip
import itertools
import json
import pathlib
from collections.abc import Callable

from qkvsearch.search.study.prepare import grid_of, space_for
from qkvsearch.search.study.replay import Table
from qkvsearch.tasks.base import TaskSizes
from tests.conftest import compose_conf

SIZES = {"kind": "language_model", "vocab_size": 128, "seq_len": 64, "n_classes": None}
STEPS = [25 * (k + 1) for k in range(12)]  # the table's validations, as trainer.max_steps=300 every 25
#: the sweep config a replay on these tables composes: the bench space, the table's steps
TABLE_TRAINER = ["space=bench", "trainer.max_steps=300", "trainer.val_check_interval=25"]


def bench_grid() -> list[dict]:
    """Every configuration of the bench space, in a fixed order."""
    grid = grid_of(space_for(compose_conf("sweep", ["space=bench"]), TaskSizes(**SIZES)))
    names = sorted(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


def write_table(path: pathlib.Path, curve: Callable[[int, int, int], float], seeds: int = 2) -> Table:
    """A table where configuration ``i``'s loss at validation ``k`` in seed ``s`` is ``curve(i, k, s)``
    and every validation takes two seconds."""
    configs = [{"params": params, "n_params": 1000, "flops_per_token": 2000 + i,
                "runs": [{"seed": s, "val_loss": [curve(i, k, s) for k in range(len(STEPS))],
                          "seconds": [2.0 * (k + 1) for k in range(len(STEPS))]} for s in range(seeds)]}
               for i, params in enumerate(bench_grid())]
    with gzip.open(path, "wt") as handle:
        json.dump({"steps": STEPS, "tokens_per_step": 2048, "task": SIZES, "configs": configs}, handle)
    return Table.load(path)
