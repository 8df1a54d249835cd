"""Reading many trials from a database at once: a worker's first look at a large study.

Optuna's RDBStorage builds an ORM object for every row of every trial it reads; here a
large read is plain columns, in pieces, built into the same trials. The private Optuna
names read (RDBStorage's trial reader and builder, its session, its row models and their
naive-UTC time columns) are checked by tests/search/test_coordination.py, which compares
both readers trial for trial.
"""

from __future__ import annotations

import datetime
import itertools
import json
import operator
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

#: trials a database storage reads in one query when it reads many (a worker's first look)
READ_CHUNK = 500


class Decoder:
    """Decodes the stored text of one large read, each distinct distribution and each
    distinct scalar value once: a study has few distributions, and its trials repeat their
    attributes' values (an architecture's fields, a worker's host). A list or a dict is
    decoded for every trial, since a caller may change its own."""

    def __init__(self) -> None:
        self._distributions: dict[str, Any] = {}
        self._scalars: dict[str, Any] = {}

    def distribution(self, text: str) -> Any:
        if text not in self._distributions:
            self._distributions[text] = optuna.distributions.json_to_distribution(text)
        return self._distributions[text]

    def value(self, text: str) -> Any:
        if text[:1] in "[{":
            return json.loads(text)
        if text not in self._scalars:
            self._scalars[text] = json.loads(text)
        return self._scalars[text]


class ChunkedRDBStorage(RDBStorage):
    """Optuna's RDBStorage, reading a large set of trials in pieces of :data:`READ_CHUNK`.

    Optuna reads every trial its cache has not seen in one query, and builds an ORM object
    for every row of all of them (parameters, attributes, intermediate values) at once: at
    10,000 trials that peak is ten times what the trials keep, a process's heap does not
    give it back, and the objects are most of the read's time (``benchmarks/memory.py``).
    Here a large read comes in pieces, each read as plain columns, one query per table,
    and built into the same trials (distributions shared: a study has few). A read of few
    trials, or one filtered by state (the running or queued ones), is Optuna's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_up_to: dict[int, int] = {}  # study id: the highest trial id read whole

    def _get_trials(self, study_id: int, states: Any, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        known = self._read_up_to.get(study_id)
        if states is not None or (known is not None and trial_id_greater_than >= known - READ_CHUNK):
            trials = super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)
        else:
            trials = self._read_in_pieces(study_id, included_trial_ids, trial_id_greater_than)
        if states is None and trials:
            self._read_up_to[study_id] = max(known or -1, trials[-1]._trial_id)
        return trials

    def _read_in_pieces(self, study_id: int, included: set[int], above: int) -> list[FrozenTrial]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        model = models.TrialModel
        with _create_scoped_session(self.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session)
            wanted = model.trial_id > above
            old = [ident for ident in included if ident <= above]
            if old:
                wanted = sqlalchemy.or_(wanted, model.trial_id.in_(old))
            ids = [ident for (ident,) in session.query(model.trial_id).filter(model.study_id == study_id, wanted)
                   .order_by(model.trial_id)]
        decoder = Decoder()
        trials: list[FrozenTrial] = []
        for start in range(0, len(ids), READ_CHUNK):
            with _create_scoped_session(self.scoped_session) as session:
                trials += _trials_from_columns(session, ids[start:start + READ_CHUNK], decoder)
        return trials


def _local(utc: datetime.datetime | None) -> datetime.datetime | None:
    """A row's naive UTC time as Optuna's trial model gives it: naive local time."""
    return utc.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None) if utc is not None else None


def _trials_from_columns(session: Any, ids: list[int], decoder: Decoder) -> list[FrozenTrial]:
    """The trials ``ids``, built as Optuna's RDBStorage builds them, from their rows' columns
    (one query per table, no ORM objects: those cost most of Optuna's read, and the
    session's commit then expires each one)."""
    from optuna.storages._rdb import models

    trial, value, param, user, system, step = (
        models.TrialModel, models.TrialValueModel, models.TrialParamModel, models.TrialUserAttributeModel,
        models.TrialSystemAttributeModel, models.TrialIntermediateValueModel)

    connection = session.connection()  # plain Core rows: the ORM session's result machinery costs as much again

    def rows(*columns: Any, order: Any) -> Any:
        """The rows of the trials ``ids`` (``columns[0]`` their trial id), in ``order``."""
        return connection.execute(sqlalchemy.select(*columns).where(columns[0].in_(ids)).order_by(*order))

    def grouped(*columns: Any, order: Any) -> dict[int, list[Any]]:
        """Each trial's rows, in ``order`` within the trial."""
        found = rows(*columns, order=(columns[0], order)).all()
        return {ident: list(group) for ident, group in itertools.groupby(found, key=operator.itemgetter(0))}

    values = grouped(value.trial_id, value.objective, value.value, value.value_type, order=value.trial_value_id)
    params = grouped(param.trial_id, param.param_name, param.param_value, param.distribution_json, order=param.param_id)
    users = grouped(user.trial_id, user.key, user.value_json, order=user.trial_user_attribute_id)
    systems = grouped(system.trial_id, system.key, system.value_json, order=system.trial_system_attribute_id)
    steps = grouped(step.trial_id, step.step, step.intermediate_value, step.intermediate_value_type,
                    order=step.trial_intermediate_value_id)
    built = []
    for ident, number, state, started, completed in rows(trial.trial_id, trial.number, trial.state,
                                                          trial._datetime_start_utc, trial._datetime_complete_utc,
                                                          order=(trial.trial_id,)):
        objectives = values.get(ident, [])
        scores: list[float] | None = [0.0] * len(objectives) if objectives else None
        for _, objective, stored, kind in objectives:
            scores[objective] = value.stored_repr_to_value(stored, kind)  # type: ignore[index]
        dists = {name: decoder.distribution(source) for _, name, _, source in params.get(ident, [])}
        built.append(FrozenTrial(
            number=number, state=state, value=None, values=scores, datetime_start=_local(started),
            datetime_complete=_local(completed),
            params={name: dists[name].to_external_repr(internal) for _, name, internal, _ in params.get(ident, [])},
            distributions=dists,
            user_attrs={key: decoder.value(text) for _, key, text in users.get(ident, [])},
            system_attrs={key: decoder.value(text) for _, key, text in systems.get(ident, [])},
            intermediate_values={at: step.stored_repr_to_intermediate_value(stored, kind)
                                 for _, at, stored, kind in steps.get(ident, [])},
            trial_id=ident))
    return built
