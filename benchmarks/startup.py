"""Start-up cost of the qkv command line, as CPU time relative to a bare `python -c pass`.

Every row runs its command and the bare interpreter alternately (ABBA), several times, and
prints the median CPU seconds (user + system, children included) and their ratio. CPU
time, not wall time: this machine is shared, and a waiting process costs no CPU. The last
two rows are the floor of a worker: a trial trains with torch and Lightning, and importing
Lightning imports torchmetrics (Lightning checks its version by importing it), which
imports scipy and matplotlib when they are installed (scikit-learn, which the digits task
reads its data from, brings scipy). qkvsearch spares torchmetrics' imports of scipy.signal
and transformers (search/base/lean_imports.py); the QKV_FULL_IMPORTS=1 row is the cost
without that.

    python benchmarks/startup.py [--repeats 5] [--only TEXT]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

QKV = [sys.executable, "-m", "qkvsearch.search.cli"]
ROWS = {
    "qkv --help": [*QKV, "--help"],
    "qkv sweep --help": [*QKV, "sweep", "--help"],
    "qkv sweeep (a typo)": [*QKV, "sweeep"],
    "qkv sweep n_trails=5 (a typo)": [*QKV, "sweep", "n_trails=5"],
    "qkv export --cfg job": [*QKV, "export", "--cfg", "job"],
    "  the export command's own imports (before: paid first)": [sys.executable, "-c",
                                                                 "import qkvsearch.search.commands.export"],
    "qkv dashboard --cfg job": [*QKV, "dashboard", "--cfg", "job"],
    "imports before extra workers start (launch)": [sys.executable, "-c", "import qkvsearch.search.commands.sweep"],
    "a worker's imports (qkvsearch.search.study.sweep)": [sys.executable, "-c", "import qkvsearch.search.study.sweep"],
    "  the same, QKV_FULL_IMPORTS=1 (torchmetrics whole)": ["env", "QKV_FULL_IMPORTS=1", sys.executable, "-c",
                                                            "import qkvsearch.search.study.sweep"],
    "  of which torch": [sys.executable, "-c", "import torch"],
    "  of which torch + Lightning": [sys.executable, "-c", "import torch, lightning"],
}
BARE = [sys.executable, "-c", "pass"]


def cpu_seconds(command: list[str]) -> float:
    """CPU time (user + system) that ``command`` spent."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="the rows whose name contains this text")
    args = parser.parse_args()
    print(f"{'command':<56} {'CPU s':>7} {'bare s':>7} {'ratio':>7}")
    for name, command in ROWS.items():
        if args.only not in name:
            continue
        mine, bare = [], []
        for i in range(args.repeats):
            pair = [(command, mine), (BARE, bare)]
            for cmd, out in (pair if i % 2 == 0 else pair[::-1]):
                out.append(cpu_seconds(cmd))
        m, b = statistics.median(mine), statistics.median(bare)
        print(f"{name:<56} {m:7.2f} {b:7.3f} {m / max(b, 1e-3):6.1f}x")


if __name__ == "__main__":
    main()
