"""The sweep's finalists stage: the best distinct architectures trained again with more seeds
(``finalists``, ``finalist_seeds``), once the study's trials are done."""

from __future__ import annotations

from qkvsearch.search.inspect.finalists import enqueue_finalists
from qkvsearch.search.study.prepare import Worker
from qkvsearch.search.study.search import run_worker
from qkvsearch.search.study.storage import slot_lock


def run_finalists(worker: Worker, k: int, seeds: int, objectives: list[str]) -> None:
    """Queues, under the study's lock, the retrainings the study does not hold yet, and runs
    them with any retry still queued; nothing for ``k=0`` or several objectives."""
    study = worker.study
    if not k or len(study.directions) > 1:
        return
    with slot_lock(worker.storage_cfg, study.study_name):
        queued = enqueue_finalists(study, k, seeds)
    if queued:
        print(f"finalists: {queued} more trials retrain the {k} best architectures with "
              f"{seeds} more seeds each", flush=True)
    run_worker(worker, n_trials=0, objectives=objectives)
