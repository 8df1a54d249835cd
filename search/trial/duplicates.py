"""Trials of the same candidate (architecture and sampled optimiser settings): one trains,
the others take its values, and a trial whose twin is still training on another worker
waits for it instead of training it twice."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from qkvsearch.models import ArchConfig
from qkvsearch.search.base import signals
from qkvsearch.search.base.keys import WAITED_FOR, candidate_of
from qkvsearch.search.base.signals import backoff
from qkvsearch.search.inspect.selection import frozen


def candidate_hash(arch: ArchConfig, optim: dict[str, Any]) -> str:
    """What makes two trials the same candidate: the architecture and the optimiser
    settings the space sampled (the architecture's fingerprint alone when it sampled none)."""
    fingerprint = arch.fingerprint()
    if not optim:
        return fingerprint
    return hashlib.sha256(json.dumps([fingerprint, sorted(optim.items())]).encode()).hexdigest()[:16]


def find_duplicate(study: optuna.Study, key: str, number: int) -> optuna.trial.FrozenTrial | None:
    """Returns the earliest complete trial that trained the same candidate."""
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.number != number and candidate_of(other) == key:
            return other
    return None


@dataclasses.dataclass(frozen=True)
class Waits:
    """How a trial waits for its twin on another worker: every ``poll_s`` seconds at most,
    failing dead workers' trials with ``reap`` first, sleeping with ``pause``."""

    poll_s: float = 5.0
    reap: Callable[[], None] = lambda: None
    pause: Callable[[float], None] = signals.pause


def wait_for_twin(study: optuna.Study, trial: optuna.Trial, key: str, waits: Waits) -> FrozenTrial | None:
    """Waits while an earlier trial of the same candidate (``candidate_hash``) runs on another worker
    (``waits.reap`` fails it if that worker dies); returns it once finished (None when there is none)."""
    twin = None
    delays = backoff(waits.poll_s)
    while True:
        if twin is not None:
            waits.reap()
        running = [
            t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number < trial.number and candidate_of(t) == key
        ]
        if not running:
            return None if twin is None else frozen(study, twin)
        if twin is None:  # recorded once (an earlier check read 'waited_for: 0' as unset and wrote it every poll)
            trial.set_user_attr(WAITED_FOR, running[0].number)
        twin = running[0].number
        waits.pause(next(delays))
