"""The sweep's baseline stage: the space's reference configuration (the standard Transformer
a user would train anyway) trained at the same budget as the search's trials, with as many
seeds as a finalist, so the summary, the report and the export's card can say how far the
winner is ahead of it."""

from __future__ import annotations

from typing import Any

import optuna

from qkvsearch.search.base.keys import BASELINE
from qkvsearch.search.study.prepare import Worker
from qkvsearch.search.study.search import run_worker
from qkvsearch.search.study.storage import slot_lock


def run_baseline(worker: Worker, params: dict[str, Any], seeds: int, objectives: list[str]) -> None:
    """Queues, under the study's lock, the reference's seeds the study does not hold yet
    (a failed one again), and runs them; nothing without a reference or with several objectives."""
    study = worker.study
    if not params or len(study.directions) > 1:
        return
    with slot_lock(worker.storage_cfg, study.study_name):
        held = {t.user_attrs[BASELINE] for t in study.get_trials(deepcopy=False)
                if BASELINE in t.user_attrs and t.state != optuna.trial.TrialState.FAIL}
        missing = [seed for seed in range(seeds) if seed not in held]
        for seed in missing:
            study.enqueue_trial(params, user_attrs={BASELINE: seed})
    if missing:
        print(f"baseline: the space's reference configuration, {len(missing)} trial{'s' if len(missing) > 1 else ''}",
              flush=True)
    run_worker(worker, n_trials=0, objectives=objectives)
