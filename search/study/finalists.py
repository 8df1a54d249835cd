"""The sweep's finalists stage: the best distinct architectures trained again with more seeds
(``finalists``, ``finalist_seeds``), once the study's trials are done."""

from __future__ import annotations

from qkvsearch.search.inspect.finalists import enqueue_finalists
from qkvsearch.search.study.prepare import Worker
from qkvsearch.search.study.search import run_worker
from qkvsearch.search.study.storage import slot_lock


def plural(n: int, thing: str) -> str:
    """``1 more seed``, ``2 more seeds``; ``the 1 best architecture``."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


def run_finalists(worker: Worker, k: int, seeds: int, objectives: list[str]) -> None:
    """Queues, under the study's lock, the retrainings the study does not hold yet, and runs
    them with any retry still queued; nothing for ``k=0`` or several objectives."""
    study = worker.study
    if not k or len(study.directions) > 1:
        return
    with slot_lock(worker.storage_cfg, study.study_name):
        queued, architectures = enqueue_finalists(study, k, seeds)
    if queued:
        print(f"finalists: {plural(queued, 'more trial')} retrain{'s' if queued == 1 else ''} the "
              f"{plural(architectures, 'best architecture')} "
              f"with {plural(seeds, 'more seed')} each", flush=True)
    run_worker(worker, n_trials=0, objectives=objectives)
