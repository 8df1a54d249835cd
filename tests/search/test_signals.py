"""Ctrl-C in a sweep stops it between steps and between storage writes, never inside one."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time

import optuna
import pytest
import sqlalchemy
from sqlalchemy import event

from qkvsearch.search.base import signals
from qkvsearch.search.base.errors import Interrupted
from tests.conftest import tiny_sweep_conf


@contextlib.contextmanager
def cli_handler():
    """The handler `qkv` installs, for this process, as long as the block runs."""
    before = signal.signal(signal.SIGINT, signals.on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_first_signal_waits_for_a_check_and_a_second_one_raises_at_once():
    with cli_handler(), signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler has run: it only noted the signal
        with pytest.raises(Interrupted) as first:
            signals.check()
        assert first.value.signum == signal.SIGINT
        signals.check()  # raised once
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Interrupted):  # the user insists before the next check
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    with cli_handler(), pytest.raises(Interrupted):  # outside a sweep, at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_a_pause_ends_soon_after_a_signal():
    with cli_handler(), signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            signals.pause(30)
        assert time.monotonic() - start < 1


def test_a_signal_during_a_storage_write_lets_it_finish_and_stops_the_trial_at_the_next_step(tmp_path):
    # Raised inside a write (as the handler used to), the write was lost or, cut in the
    # wrong place, left SQLite's lock held so the other workers could not record anything.
    from qkvsearch.search.study.sweep import sweep

    cfg = tiny_sweep_conf(tmp_path, "n_trials=1", "pruner=median", "trainer.max_steps=40")
    sent = []

    def interrupt_the_first_report(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO trial_intermediate_values") and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGINT)  # lands while the report's transaction is open

    event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", interrupt_the_first_report)
    try:
        with cli_handler(), pytest.raises(Interrupted):
            sweep(cfg)
    finally:
        event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", interrupt_the_first_report)
    assert sent
    study = optuna.load_study(study_name=cfg.study_name, storage=f"sqlite:///{tmp_path}/studies.db")
    first, retry = study.trials
    assert first.state == optuna.trial.TrialState.FAIL and "interrupted (SIGINT)" in first.user_attrs["fail_reason"]
    assert first.intermediate_values.keys() == {10}  # the report finished; no validation after the signal
    assert retry.state == optuna.trial.TrialState.WAITING
    db = sqlite3.connect(tmp_path / "studies.db", timeout=0)  # nobody holds the write lock
    db.execute("BEGIN IMMEDIATE")
    db.rollback()


def test_a_sweep_takes_over_sigterm_and_sigusr2_and_hands_them_on_once_the_trial_is_recorded():
    # a submitit job runs the sweep outside the CLI, with submitit's handlers installed:
    # SIGUSR2 (the time limit is near) requeues the job and exits
    handed_on = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: handed_on.append(signum))
    try:
        with pytest.raises(Interrupted) as raised, signals.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert handed_on == []  # noted only: the trial is not recorded yet
            signals.check()
        assert raised.value.signum == signal.SIGUSR2 and handed_on == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is not signals.on_signal  # given back after the block
    finally:
        signal.signal(signal.SIGUSR2, before)
