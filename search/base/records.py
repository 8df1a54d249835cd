"""Writing several facts about a trial at once.

Optuna writes each user attribute in a transaction of its own: on a database every one is
a commit the server makes durable (an fsync on SQLite, a round trip on PostgreSQL), and
a trial records a dozen facts at a time (what it is, where it runs, how fast it trained).
:func:`record` writes them in one transaction on a database storage, and one by one
elsewhere (a journal appends each line under its lock; memory costs nothing).

The private Optuna names used (a trial's storage id and cached state, RDBStorage's session
and its attribute writer) are read here only; tests/search/test_coordination.py breaks when
Optuna changes them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage

#: how Optuna names a trial's constraint values among its system attributes (``constraints:<name>``)
CONSTRAINTS_KEY = "constraints"


def database_of(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage behind ``storage`` (through Optuna's cache and the project's
    resilient wrapper), or None when it is not a database."""
    seen = 0
    while not isinstance(storage, RDBStorage) and seen < 4:
        inner = getattr(storage, "inner", None) or getattr(storage, "_backend", None)
        if inner is None:
            return None
        storage, seen = inner, seen + 1
    return storage if isinstance(storage, RDBStorage) else None


def through_outage(storage: BaseStorage, call: Callable[[], Any]) -> Any:
    """``call()`` (a query or write of the database behind ``storage``) as the storage makes
    its own calls: through a server restart where it rides one out (``ResilientStorage``)."""
    through = getattr(storage, "through_outage", None)
    return through(call) if through is not None else call()


def record(trial: optuna.Trial, attrs: Mapping[str, Any], system: Mapping[str, Any] | None = None) -> None:
    """Sets the user attributes ``attrs`` (and the system attributes ``system``) of a running
    trial, in one transaction on a database (so all or none are written). Raises
    UpdateFinishedTrialError, as ``Trial.set_user_attr`` does, when another worker already
    finished the trial."""
    system = system or {}
    if not attrs and not system:
        return
    database = database_of(trial.storage)
    if database is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for key, value in system.items():
            trial.storage.set_trial_system_attr(trial._trial_id, key, value)
            trial._cached_frozen_trial.system_attrs[key] = value
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    ident = trial._trial_id

    def write() -> None:
        with _create_scoped_session(database.scoped_session, True) as session:
            for model, written in ((models.TrialUserAttributeModel, attrs), (models.TrialSystemAttributeModel, system)):
                for key, value in written.items():
                    database._set_trial_attr_without_commit(session, model, ident, key, value)

    through_outage(trial.storage, write)  # a server restart is waited out, as for every call
    trial._cached_frozen_trial.user_attrs.update(attrs)
    for key, value in system.items():
        trial._cached_frozen_trial.system_attrs[key] = value


def record_sampled(trial: optuna.Trial, constraints: Mapping[str, float], attrs: Mapping[str, Any]) -> None:
    """What a space's sampling records, in one transaction on a database: its constraint
    values, checked and stored as ``Trial.set_constraint`` does (a float, not NaN, under
    ``constraints:<name>``; one already set is kept), and user attributes. A stand-in for
    a trial (``spaces.ValuesTrial``: a warm start's or a reference's fixed values) records
    through its own calls."""
    if not isinstance(trial, optuna.Trial):
        from qkvsearch.spaces import record_one_by_one

        record_one_by_one(trial, constraints, attrs)
        return
    system = {}
    for name, value in constraints.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"constraint {name!r}: {value!r} is not a float") from None
        if math.isnan(number):
            raise ValueError(f"constraint {name!r} is NaN; a constraint value must be a number (<= 0 is feasible)")
        if f"{CONSTRAINTS_KEY}:{name}" not in trial._cached_frozen_trial.system_attrs:
            system[f"{CONSTRAINTS_KEY}:{name}"] = number
    record(trial, attrs, system)


#: how a study's system attribute holding one architecture begins (then its fingerprint)
ARCH_PREFIX = "qkv:arch:"
#: architectures this process has stored, by storage: (study id, fingerprint); each is written once a process
_STORED: weakref.WeakKeyDictionary[BaseStorage, set[tuple[int, str]]] = weakref.WeakKeyDictionary()


def record_architecture(trial: optuna.Trial, fingerprint: str, arch: dict[str, Any]) -> None:
    """Stores the architecture a trial trains once for its study (a study system attribute
    named by its fingerprint), not in every trial: 10,000 trials of a few hundred distinct
    architectures keep a few hundred copies, and optuna-dashboard's study page (which
    sends every trial's user attributes) stays small."""
    study_id = trial.study._study_id
    stored = _STORED.setdefault(trial.storage, set())
    if (study_id, fingerprint) not in stored:
        trial.storage.set_study_system_attr(study_id, ARCH_PREFIX + fingerprint, arch)
        stored.add((study_id, fingerprint))
