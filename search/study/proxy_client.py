"""The client side of ``storage=grpc``: Optuna's gRPC storage proxy client, building the
trials of a read as ``reader.py`` builds a database's.

A worker's client reads the whole study from the proxy when it starts (10,000 trials: 21
MB of messages), then only what changed. Optuna's client decodes every parameter's
distribution and every attribute's JSON text of every trial; most of that text repeats
(a study has few distributions; its trials share their attributes' values), so here each
distinct text of a read is decoded once (:class:`~.reader.Decoder`). The trials are the
same as Optuna's client builds (tests/search/test_grpc.py compares them). The private
Optuna names read (the client's cache, its entries and request, the servicer's state and
time conversions) are checked by that test.
"""

from __future__ import annotations

from typing import Any

import grpc
from optuna.storages import GrpcStorageProxy
from optuna.storages._grpc import servicer as optuna_servicer
from optuna.storages._grpc.auto_generated import api_pb2
from optuna.storages._grpc.client import GrpcClientCache, GrpcClientCacheEntry
from optuna.trial import FrozenTrial

from qkvsearch.search.study.reader import Decoder


def trial_from_message(message: Any, decoder: Decoder) -> FrozenTrial:
    """The trial an ``api_pb2.Trial`` carries, as Optuna's ``_from_proto_trial`` builds it."""
    distributions = {name: decoder.distribution(text) for name, text in message.distributions.items()}
    return FrozenTrial(
        trial_id=message.trial_id, number=message.number, state=optuna_servicer._from_proto_trial_state(message.state),
        value=None, values=list(message.values) if message.values else None,
        datetime_start=optuna_servicer._from_proto_datetime(message.datetime_start),
        datetime_complete=optuna_servicer._from_proto_datetime(message.datetime_complete),
        params={name: distributions[name].to_external_repr(internal) for name, internal in message.params.items()},
        distributions=distributions,
        user_attrs={key: decoder.value(text) for key, text in message.user_attributes.items()},
        system_attrs={key: decoder.value(text) for key, text in message.system_attributes.items()},
        intermediate_values=dict(message.intermediate_values))


class DecodedOnceCache(GrpcClientCache):
    """Optuna's client cache of a study's trials (what changed since the last read: the
    trials after the last finished one, and the unfinished ones), each read's trials built
    by :func:`trial_from_message`."""

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        study = self.studies.setdefault(study_id, GrpcClientCacheEntry())
        request = api_pb2.GetTrialsRequest(study_id=study_id, included_trial_ids=study.unfinished_trial_ids,
                                           trial_id_greater_than=study.last_finished_trial_id)
        try:
            reply = self.grpc_client.GetTrials(request)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                self.studies.pop(study_id, None)
                raise KeyError(f"no study with id {study_id}") from e
            raise
        decoder = Decoder()
        for message in reply.trials:
            self._add_trial_to_cache(study_id, trial_from_message(message, decoder))


class DecodedOnceProxy(GrpcStorageProxy):
    """Optuna's client of the proxy, its cache a :class:`DecodedOnceCache` (also once
    unpickled: Optuna's client builds its channel and cache again then)."""

    def _setup(self) -> None:
        super()._setup()
        self._cache = DecodedOnceCache(self._stub)
