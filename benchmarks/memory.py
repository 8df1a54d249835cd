"""What a worker's first read of a large study costs in memory and time: Optuna's
RDBStorage (every trial the cache has not seen in one query, as ORM objects) against the
project's ``ChunkedRDBStorage`` (the same trials, read :data:`READ_CHUNK` at a time as
plain columns), side by side on the same study.

Each read runs in a fresh process (a heap that has grown does not shrink, so two reads in
one process would hide the second one's cost), alternating the two storages, ``--rounds``
times each. Printed per storage, medians over the rounds:
  uss    growth of the process's unique memory from before to after the read (what the
         worker keeps: the trials, and the heap the read left behind)
  peak   the most Python memory the read held at once (tracemalloc, in its own process)
  kept   Python memory still held after the read (the trials themselves)
  read   seconds the read took (without tracemalloc)

The study is one ``benchmarks/coordination.py`` filled (``--url`` and ``--study``), or a
fresh SQLite one filled here.

    python benchmarks/memory.py --url postgresql+psycopg2://... --study coord-tiny-10000 [--rounds 3]
    python benchmarks/memory.py --trials 10000 [--root DIR]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import pathlib
import statistics
import sys
import time
import tracemalloc
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import coordination  # noqa: E402  (the fill and the machine's name)
import optuna  # noqa: E402
import psutil  # noqa: E402

from qkvsearch.search.study import reader as reader_module  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "memory.jsonl"
KINDS = {"optuna": optuna.storages.RDBStorage, "pieces": reader_module.ChunkedRDBStorage}


def read(kind: str, url: str, name: str, traced: bool, out: multiprocessing.Queue) -> None:
    """One worker's first read of the study through Optuna's cache, in this fresh process."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=KINDS[kind](url, skip_compatibility_check=True))
    process = psutil.Process()
    gc.collect()
    before = process.memory_full_info().uss
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    trials = study.get_trials(deepcopy=False)
    seconds = time.perf_counter() - start
    gc.collect()
    row = {"trials": len(trials), "uss_mb": (process.memory_full_info().uss - before) / 2**20, "read_s": seconds}
    if traced:
        kept, peak = tracemalloc.get_traced_memory()
        row = {"peak_mb": peak / 2**20, "kept_mb": kept / 2**20}
    out.put(row)


def measured(kind: str, url: str, name: str, traced: bool) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=read, args=(kind, url, name, traced, out))
    process.start()
    row = out.get()
    process.join()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    coordination.study_arguments(parser, rounds=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name = coordination.study_of(args, prefix="qkv-memory-")
    seen: dict[str, dict[str, list[float]]] = {kind: {} for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            for traced in (False, True):
                for key, value in measured(kind, url, name, traced).items():
                    seen[kind].setdefault(key, []).append(value)
    median = {kind: {key: statistics.median(values) for key, values in row.items()} for kind, row in seen.items()}
    print(f"memory: {coordination.machine()}; {url.split(':', 1)[0]}, {median['optuna']['trials']:.0f} trials, "
          f"{args.rounds} rounds, pieces of {reader_module.READ_CHUNK}")
    for kind, row in median.items():
        print(f"  {kind:7} uss +{row['uss_mb']:6.0f} MB  peak {row['peak_mb']:6.0f} MB  kept {row['kept_mb']:5.0f} MB  "
              f"read {row['read_s']:5.2f} s")
    optuna_row, pieces = median["optuna"], median["pieces"]
    print(f"  optuna/pieces: uss {optuna_row['uss_mb'] / pieces['uss_mb']:.1f}x, "
          f"peak {optuna_row['peak_mb'] / pieces['peak_mb']:.1f}x, read {optuna_row['read_s'] / pieces['read_s']:.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps({"date": datetime.date.today().isoformat(), "machine": coordination.machine(),
                              "storage": url.split(":", 1)[0], "read_chunk": reader_module.READ_CHUNK,
                              "rounds": args.rounds, **{kind: {k: round(v, 3) for k, v in row.items()}
                                                        for kind, row in median.items()}}) + "\n")


if __name__ == "__main__":
    main()
