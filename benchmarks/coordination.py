"""How a shared study holds up as it grows: many workers, tens of thousands of trials.

Fills a study with N realistic trials (the project's own sampling and trial path made
them: parameters, user and system attributes, intermediate values, states in the
proportions a hyperband sweep leaves), then starts W worker processes together, each
through the sweep's real worker path (`prepare`, the slot lock, lost-trial reaping,
`next_trial`, the space's sampling with the configured sampler, the heartbeat, `tell`)
with an objective that reports intermediate values like a trial but trains nothing.

Prints per storage, size and worker count:
  first   a worker's first ask, from all starting together (median, slowest)
  hold    the slot lock held (median, p99); wait: waited for (median, p99)
  ask     `next_trial` whole (median, p99)
  sample  the space's sampling of one trial (median, p99)
  cpu     CPU seconds per trial in the worker (ask, sampling, reports, tell)
  rate    trials handed out per second, all workers together
  writes  commits (RDB) or journal appends per trial
  memory  the machine's used memory at its peak while the workers ran, and before them (GB)

Then, with --inspect, the commands that read a whole study: `qkv report`, the end-of-
sweep summary and optuna-dashboard's study page (its payload size too).

Run: python benchmarks/coordination.py [--trials 1000 10000] [--storages sqlite journal postgresql grpc]
                                        [--workers 1 8 32] [--asks 4] [--space tiny] [--inspect]
PostgreSQL: --postgres URL, else a throwaway server is started (the PostgreSQL packages).
grpc: the same database through `qkv storage-proxy`, started here on a free port.
Results are appended to benchmarks/results/coordination.jsonl with the date and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))  # the checkout as the package qkvsearch (as benchmarks/ siblings do)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore", message=".*experimental")  # Optuna's notes on group= and metric names

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402

from qkvsearch.search.base.configs import compose_config  # noqa: E402
from qkvsearch.search.study import workers as worker_module  # noqa: E402
from qkvsearch.search.study.prepare import prepare  # noqa: E402
from qkvsearch.search.study.search import placement, run_trial  # noqa: E402
from qkvsearch.search.study.storage import open_storage  # noqa: E402
from qkvsearch.search.study.workers import next_trial  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import whole_study  # noqa: E402  (--inspect)

RESULTS = ROOT / "benchmarks" / "results" / "coordination.jsonl"
STEPS = 12  # validations a trial reports (300 steps, one every 25)


class NoTraining:
    """A backend that trains nothing: reports a falling curve (pruned where the pruner
    says so) and records what a trained trial records, so each trial writes what a real
    one does."""

    def train(self, trial: optuna.Trial, arch: Any, prune: bool) -> list[float]:
        value = 3.0 + (hash(trial.params.get("n_layers", 1)) % 7) / 10 + trial.number % 5 / 10
        seconds = []
        for step in range(1, STEPS + 1):
            value *= 0.97
            seconds.append(step * 0.8)
            trial.report(value, step * 25)
            if prune and trial.should_prune():
                trial.set_user_attr("seconds_at", seconds)
                raise optuna.TrialPruned(f"pruned at step {step * 25}")
        for key, attr in {"seconds_at": seconds, "train_tokens": 300 * 16 * 64, "best_step": 300, "compiled": False,
                          "device": "cpu", "device_name": "cpu", "memory_estimate_mb": 40,
                          "train_tokens_per_s": 30000.0}.items():
            trial.set_user_attr(key, attr)
        return [value]


def overrides_for(kind: str, where: pathlib.Path, url: str | None, space: str, name: str, n_trials: int,
                  proxy_port: int | None = None) -> list[str]:
    storage = {"sqlite": ["storage=sqlite"], "journal": ["storage=journal"],
               "postgresql": ["storage=postgres", f"storage.url={url}"],
               # the workers through `qkv storage-proxy` (filled, like any study, through the database)
               "grpc": ["storage=grpc", f"storage.port={proxy_port}", f"storage.url={url}"] if proxy_port
               else ["storage=postgres", f"storage.url={url}"]}[kind]
    return [*storage, f"run_root={where}", f"space={space}", "task=recall", f"study_name={name}", f"n_trials={n_trials}",
            "finalists=0", "baseline=false", "artifacts=null", "threads=1"]


def storage_of(worker: Any) -> Any:
    """The innermost Optuna storage behind a worker's (through the resilient and cached wrappers)."""
    storage = worker.storage
    for attr in ("inner", "_backend"):
        storage = getattr(storage, attr, storage)
    return getattr(storage, "_backend", storage)


class Writes:
    """Counts the transactions that wrote (RDB: each is a commit the database must make
    durable; Optuna commits its reads too, which cost nothing) or journal appends."""

    def __init__(self, storage: Any) -> None:
        self.count, self.dirty = 0, False
        if isinstance(storage, optuna.storages.RDBStorage):
            sqlalchemy.event.listen(storage.engine, "before_cursor_execute", self.statement)
            sqlalchemy.event.listen(storage.engine, "commit", self.commit)
        elif isinstance(storage, optuna.storages.JournalStorage):
            backend = storage._backend
            append = backend.append_logs

            def counted(logs: list[dict[str, Any]]) -> None:
                self.count += 1
                append(logs)
            backend.append_logs = counted

    def statement(self, _conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        self.dirty = self.dirty or sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE")

    def commit(self, *_: Any) -> None:
        self.count += self.dirty
        self.dirty = False


def copies_of(templates: list[optuna.trial.FrozenTrial], n: int) -> list[optuna.trial.FrozenTrial]:
    """``n`` new trials, copies of ``templates`` in turn (their states, values, parameters,
    attributes and intermediate values)."""
    return [optuna.trial.create_trial(
        state=t.state, values=t.values, params=t.params, distributions=t.distributions, user_attrs=t.user_attrs,
        system_attrs=t.system_attrs, intermediate_values=t.intermediate_values)
        for i in range(n) for t in [templates[i % len(templates)]]]


def fill(overrides: list[str], n: int) -> None:
    """Makes the study and fills it to ``n`` trials: a few dozen made by the real trial path
    (with the configured sampler and pruner), then copies of them."""
    cfg = compose_config("sweep", overrides)
    prepared = prepare(cfg)
    worker = prepared.worker
    study = worker.study
    have = len(study.get_trials(deepcopy=False))
    if have >= n:
        return
    worker.objective.backend = NoTraining()
    while len(study.get_trials(deepcopy=False)) < min(n, 48):
        trial = next_trial(study, worker.storage, worker.storage_cfg, n, worker.retry)
        run_trial(worker, trial)
    templates = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    copies = copies_of(templates, n - len(study.get_trials(deepcopy=False)))
    for start in range(0, len(copies), 500):
        study.add_trials(copies[start:start + 500])


def study_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options of a benchmark that reads one filled study (counts.py, memory.py)."""
    parser.add_argument("--url", help="a database URL holding the study (else a SQLite study is filled)")
    parser.add_argument("--study", help="the study's name in --url")
    parser.add_argument("--trials", type=int, default=10000, help="trials to fill when no --url is given")
    parser.add_argument("--root", type=pathlib.Path, help="where a filled study lives (kept: reruns reuse it)")
    parser.add_argument("--rounds", type=int, default=rounds)


def study_of(args: argparse.Namespace, prefix: str) -> tuple[str, str]:
    """The URL and name of the study :func:`study_arguments` chose: ``--url``'s, or a SQLite
    one filled here with ``--trials`` trials."""
    if args.url is not None:
        return args.url, args.study
    root = args.root or pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    name = f"coord-tiny-{args.trials}"
    overrides = overrides_for("sqlite", root, None, "tiny", name, args.trials)
    fill(overrides, args.trials)
    return str(compose_config("sweep", overrides).storage.url), name


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def work(overrides: list[str], asks: int, barrier: Any, results: Any) -> None:
    """One worker: prepares as a sweep does, waits for the others, then takes ``asks`` trials."""
    cfg = compose_config("sweep", overrides)
    prepared = prepare(cfg)
    worker = prepared.worker
    worker.objective.backend = NoTraining()
    holds, waits, samples = [], [], []
    real_lock, real_sample = worker_module.slot_lock, worker.objective.sample

    @contextlib.contextmanager
    def timed_lock(storage_cfg: Any, name: str) -> Any:
        asked = time.perf_counter()
        with real_lock(storage_cfg, name):
            got = time.perf_counter()
            waits.append(got - asked)
            try:
                yield
            finally:
                holds.append(time.perf_counter() - got)

    def timed_sample(trial: optuna.Trial) -> Any:
        start = time.perf_counter()
        try:
            return real_sample(trial)
        finally:
            samples.append(time.perf_counter() - start)

    worker_module.slot_lock = timed_lock
    worker.objective.sample = timed_sample
    writes = Writes(storage_of(worker))
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    holds.clear(), waits.clear()
    written, first, ask_s, done, trials = writes.count, None, [], 0, 0
    for _ in range(asks):
        asked = time.perf_counter()
        trial = next_trial(worker.study, worker.storage, worker.storage_cfg, int(cfg.n_trials), worker.retry,
                           placement(worker.index))  # as run_worker takes it
        ask_s.append(time.perf_counter() - asked)
        first = first if first is not None else time.perf_counter() - start
        if trial is None:
            break
        run_trial(worker, trial)
        trials += 1
    done = time.perf_counter()
    results.put({"first": first, "holds": holds, "waits": waits, "asks": ask_s, "samples": samples, "trials": trials,
                 "cpu": time.process_time() - cpu, "start": start, "end": done, "writes": writes.count - written})


class WorkersDied(Exception):
    """Workers of a run died without a result (the OOM killer, a crash)."""


def gather(procs: list[Any], results: Any) -> list[dict[str, Any]]:
    """Each worker's result as it comes. A worker that died without one (the OOM killer, a
    crash) ends the run (:class:`WorkersDied`, with the exit codes), instead of a queue that
    waits for ever."""
    import queue

    got: list[dict[str, Any]] = []
    while len(got) < len(procs):
        try:
            got.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for proc in procs:
                    proc.kill()
                codes = sorted({p.exitcode for p in dead})
                raise WorkersDied(f"{len(dead)} of {len(procs)} workers died without a result (exit codes {codes}; "
                                  "-9 is SIGKILL, as the OOM killer sends): fewer workers, or more memory") from None
    return got


def used_gb() -> float:
    """The machine's memory in use (MemTotal less MemAvailable), every process's: the
    workers', the database server's and the proxy's."""
    seen = dict(line.split(":", 1) for line in pathlib.Path("/proc/meminfo").read_text().splitlines())
    return (int(seen["MemTotal"].split()[0]) - int(seen["MemAvailable"].split()[0])) / 2**20


class MemoryPeak:
    """The highest `used_gb` seen every half second while the block runs."""

    def __enter__(self) -> MemoryPeak:
        import threading

        self.before = self.peak = used_gb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            self.peak = max(self.peak, used_gb())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def drive(overrides: list[str], workers: int, asks: int) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(workers), context.Queue()
    procs = [context.Process(target=work, args=(overrides, asks, barrier, results)) for _ in range(workers)]
    with MemoryPeak() as memory:
        for proc in procs:
            proc.start()
        try:
            got = gather(procs, results)
        except WorkersDied as died:  # the row says so, with the memory it reached; the next runs go on
            for proc in procs:
                proc.join()
            return {"died": str(died), "memory_peak_gb": memory.peak, "memory_before_gb": memory.before}
        for proc in procs:
            proc.join()
    flat = {key: [v for g in got for v in g[key]] for key in ("holds", "waits", "asks", "samples")}
    trials = sum(g["trials"] for g in got)
    span = max(g["end"] for g in got) - min(g["start"] for g in got)
    firsts = [g["first"] for g in got]
    return {
        "first_median_s": statistics.median(firsts), "first_max_s": max(firsts),
        "hold_median_ms": 1e3 * statistics.median(flat["holds"]), "hold_p99_ms": 1e3 * percentile(flat["holds"], 0.99),
        "wait_median_ms": 1e3 * statistics.median(flat["waits"]), "wait_p99_ms": 1e3 * percentile(flat["waits"], 0.99),
        "ask_median_ms": 1e3 * statistics.median(flat["asks"]), "ask_p99_ms": 1e3 * percentile(flat["asks"], 0.99),
        "sample_median_ms": 1e3 * statistics.median(flat["samples"]),
        "sample_p99_ms": 1e3 * percentile(flat["samples"], 0.99),
        "cpu_per_trial_s": sum(g["cpu"] for g in got) / max(trials, 1), "trials_per_s": trials / span,
        "writes_per_trial": sum(g["writes"] for g in got) / max(trials, 1), "trials": trials,
        "memory_peak_gb": memory.peak, "memory_before_gb": memory.before,
    }


def postgres_url(given: str | None) -> tuple[str, Any]:
    if given:
        return given, None
    sys.path.insert(0, str(ROOT))
    from tests.search.postgres import Cluster  # the tests' throwaway server on 127.0.0.1

    cluster = Cluster()
    return cluster.url, cluster


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_proxy(url: str) -> tuple[subprocess.Popen, int]:
    """``qkv storage-proxy`` for ``url`` on a free port of 127.0.0.1, listening."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qkvsearch.search.cli", "storage-proxy", f"storage.url={url}",
                             f"port={port}", "threads=64"], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the storage proxy did not start")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def code() -> str:
    """The commit the benchmark ran (``+changes`` when the work tree differs from it, the
    results this benchmark appends to aside)."""
    here = pathlib.Path(__file__).resolve().parent
    run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=here).stdout.strip()  # noqa: E731
    head = run("rev-parse", "--short", "HEAD") or "unknown"
    changed = run("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
    return head + ("+changes" if changed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--storages", nargs="+", default=["sqlite", "journal", "postgresql"],
                        choices=["sqlite", "journal", "postgresql", "grpc"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--asks", type=int, default=4, help="trials each worker takes")
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--postgres", help="a PostgreSQL URL (default: start a throwaway server)")
    parser.add_argument("--inspect", action="store_true", help="time report, summary and dashboard on each study")
    parser.add_argument("--root", type=pathlib.Path, help="where the studies live (kept: reruns reuse the fills)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = args.root or pathlib.Path(tempfile.mkdtemp(prefix="qkv-coord-"))
    server = {"postgresql", "grpc"} & set(args.storages)
    url, cluster = postgres_url(args.postgres) if server else (None, None)
    stamp = {"date": datetime.date.today().isoformat(), "machine": machine(), "code": code()}
    print(f"coordination: {stamp['machine']}; studies under {root}", flush=True)
    header = (f"{'storage':10} {'trials':>6} {'W':>3} {'first s':>13} {'hold ms':>13} {'wait ms':>15} {'ask ms':>15} "
              f"{'sample ms':>13} {'cpu s':>6} {'trials/s':>8} {'writes':>6} {'memory GB':>11}")
    try:
        for kind in args.storages:
            for n in args.trials:
                name = f"coord-{args.space}-{n}" + ("-grpc" if kind == "grpc" else "")
                base = overrides_for(kind, root / kind, url, args.space, name, n)
                context = multiprocessing.get_context("fork")
                start = time.perf_counter()
                filler = context.Process(target=fill, args=(base, n))
                filler.start()
                filler.join()
                print(f"{kind}: {n} trials ready in {time.perf_counter() - start:.0f} s", flush=True)
                print(header, flush=True)
                proxy, port = start_proxy(url) if kind == "grpc" else (None, None)
                for w in args.workers:
                    have = len(optuna.load_study(study_name=name, storage=open_storage(
                        compose_config("sweep", base).storage)).get_trials(deepcopy=False))
                    row = drive(overrides_for(kind, root / kind, url, args.space, name, have + w * args.asks, port),
                                w, args.asks)
                    if "died" in row and proxy is not None and proxy.poll() is not None:
                        row["died"] += f"; the storage proxy had exited ({proxy.returncode}; -9: SIGKILL)"
                    if "died" in row:
                        print(f"{kind:10} {have:>6} {w:>3} {row['died']}; the machine's memory reached "
                              f"{row['memory_peak_gb']:.1f} GB (from {row['memory_before_gb']:.1f})", flush=True)
                    else:
                        print(f"{kind:10} {have:>6} {w:>3} {row['first_median_s']:>6.2f}/{row['first_max_s']:<6.2f} "
                              f"{row['hold_median_ms']:>6.1f}/{row['hold_p99_ms']:<6.1f} "
                              f"{row['wait_median_ms']:>7.1f}/{row['wait_p99_ms']:<7.1f} "
                              f"{row['ask_median_ms']:>7.1f}/{row['ask_p99_ms']:<7.1f} "
                              f"{row['sample_median_ms']:>6.1f}/{row['sample_p99_ms']:<6.1f} {row['cpu_per_trial_s']:>6.2f} "
                              f"{row['trials_per_s']:>8.2f} {row['writes_per_trial']:>6.1f} "
                              f"{row['memory_peak_gb']:>5.1f}/{row['memory_before_gb']:<5.1f}", flush=True)
                    with RESULTS.open("a") as out:
                        out.write(json.dumps({**stamp, "storage": kind, "space": args.space, "trials_before": have,
                                              "workers": w, "asks": args.asks, **row}) + "\n")
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait()
                if args.inspect:
                    seen = whole_study.inspect(base)
                    print(f"{kind:10} {n:>6} inspect: " + ", ".join(f"{k} {v:.2f}" for k, v in seen.items()), flush=True)
                    with RESULTS.open("a") as out:
                        out.write(json.dumps({**stamp, "storage": kind, "space": args.space, "trials_before": n,
                                              "inspect": seen}) + "\n")
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
