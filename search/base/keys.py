"""The names of the attributes a sweep records on its trials and studies, in one place.

Optuna keeps them as plain strings in the storage, so the dashboard, a report made on
another machine and an older study all read the same names; code reads them from here.
"""

from __future__ import annotations

from typing import Any

# --- on a trial (user attributes) ---------------------------------------------------
#: the architecture as plain data (``ArchConfig.to_dict``) and its fingerprint
ARCH, ARCH_HASH = "arch", "arch_hash"
#: the optimiser settings the space sampled (lr, ...), and what makes two trials the same candidate
OPTIM, CANDIDATE_HASH = "optim", "candidate_hash"
#: analytic sizes of the architecture
N_PARAMS, FLOPS_PER_TOKEN = "n_params", "flops_per_token"
#: why a trial was pruned (infeasible, by the pruner, out of memory, ...) or failed
PRUNED_REASON, FAIL_REASON, TRACEBACK = "pruned_reason", "fail_reason", "traceback"
#: how the fail reason of a trial failed for its worker's silence begins (``reap_lost``)
LOST = "worker lost"
#: how a pruner's reason begins (proxy trust finds the first rung by it)
PRUNED_BY = "pruned by"
#: the earlier trial of the same candidate whose values this one took, or waited for
DUPLICATE_OF, WAITED_FOR = "duplicate_of", "waited_for"
#: a retry's lost trial; a finalist's original trial and its seed index
RETRY_OF, FINALIST_OF, FINALIST_SEED = "retry_of", "finalist_of", "finalist_seed"
#: the study and trial a warm-started trial came from ("study#number")
WARM_STARTED_FROM = "warm_started_from"
#: a trial of the space's reference configuration (the baseline the winner is measured against): its seed index
BASELINE = "baseline"
#: compute: tokens trained (a pruned trial's too) and seconds since training began at each validation
TRAIN_TOKENS, SECONDS_AT = "train_tokens", "seconds_at"

# --- on a study (user attributes) ---------------------------------------------------
#: what the study is: its uid and run folder, task, space, objectives and code version
UID, RUN_SUBDIR, TASK, TASK_CONFIG, SPACE, OBJECTIVES, CODE_VERSION = (
    "uid", "run_subdir", "task", "task_config", "space", "objectives", "code_version")
#: a multirun job's own overrides (its name holds only their digest)
OVERRIDES = "overrides"
#: held-out test scores of the best trials, ``{number: {"test_loss": .., "test_acc": ..}}``
TEST_SCORES = "test_scores"
#: the folders ``qkv export`` wrote from the study: ``[{"trial", "format", "folder", "exported"}, ...]``
EXPORTS = "exports"
#: how many processes have joined the study (the next worker's index)
WORKERS_JOINED = "workers_joined"
# WARM_STARTED_FROM also names the study's record of what warm start queued and skipped.


def is_finalist(trial: Any) -> bool:
    """True for a finalist's retraining (a trial that repeats another with a new seed)."""
    return FINALIST_OF in trial.user_attrs


def pinned(trial: Any) -> bool:
    """True for a trial that repeats a fixed configuration for its own sake (a finalist's
    retraining, a baseline's seed): trained in full, never pruned or taken as a duplicate,
    not counted towards ``n_trials`` nor ranked with the search."""
    return is_finalist(trial) or BASELINE in trial.user_attrs


def candidate_of(trial: Any) -> str | None:
    """The candidate a trial trained: its architecture and sampled optimiser settings
    (trials made before candidates had a key of their own carry their architecture's)."""
    return trial.user_attrs.get(CANDIDATE_HASH, trial.user_attrs.get(ARCH_HASH))


def reason(trial: Any) -> str:
    """Why a trial did not complete ('' when it says nothing)."""
    return str(trial.user_attrs.get(PRUNED_REASON) or trial.user_attrs.get(FAIL_REASON) or "")
