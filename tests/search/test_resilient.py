"""What a worker says about its storage's outages: the loss, and the end of it however the
server's first answer reads."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError

from qkvsearch.search.study.resilient import Outage


def _unreachable_database(tmp_path):
    """A real lost connection: SQLAlchemy's OperationalError from a database that cannot be opened."""
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/no-such-dir/studies.db")
    with engine.connect():
        pass


@pytest.fixture
def finished_trial(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/studies.db")
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    study.tell(trial, 1.0)
    return storage, trial._trial_id


def test_an_outage_that_ends_in_the_servers_own_error_is_reported_over(tmp_path, finished_trial, capsys):
    """The proxy comes back and its first answer is that another worker failed the trial meanwhile
    (what test_grpc's kill -9 saw): the outage is over all the same, and the worker says so."""
    storage, trial_id = finished_trial
    calls = []

    def report() -> None:
        calls.append(1)
        if len(calls) == 1:
            _unreachable_database(tmp_path)
        storage.set_trial_intermediate_value(trial_id, 1, 0.5)

    outage = Outage("sqlite:///studies.db", outage_s=30)
    with pytest.raises(UpdateFinishedTrialError):
        outage.call(report)
    err = capsys.readouterr().err
    assert len(calls) == 2 and "connection lost (unable to open database file)" in err
    assert "connection back after" in err and outage.recovered_at > 0 and not outage.down


def test_a_call_that_never_lost_its_connection_says_nothing(tmp_path, finished_trial, capsys):
    storage, trial_id = finished_trial
    outage = Outage("sqlite:///studies.db", outage_s=30)
    with pytest.raises(UpdateFinishedTrialError):
        outage.call(storage.set_trial_intermediate_value, trial_id, 1, 0.5)
    assert capsys.readouterr().err == "" and outage.recovered_at == 0


def test_past_the_limit_the_worker_gives_up_for_good_with_one_line(tmp_path, capsys):
    from qkvsearch.search.base.errors import StorageUnreachable

    outage = Outage("sqlite:///gone.db", outage_s=0.6)
    with pytest.raises(StorageUnreachable, match=r"unreachable for 1 s \(storage.outage_s=0.6\)"):
        outage.call(_unreachable_database, tmp_path)
    with pytest.raises(StorageUnreachable):  # every later call at once, without retrying
        outage.call(lambda: pytest.fail("called after the storage was given up"))
    assert "connection back" not in capsys.readouterr().err
