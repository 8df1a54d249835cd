"""qkv dashboard (the real optuna-dashboard) and qkv report, looked at in a headless browser."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta

from qkvsearch.search.base.network import check_port
from qkvsearch.search.base.records import ARCH_PREFIX
from qkvsearch.search.commands.report import render, report
from qkvsearch.search.inspect.selection import architecture
from qkvsearch.search.study.storage import open_storage
from qkvsearch.search.study.sweep import sweep
from tests.conftest import compose_conf, tiny_sweep_conf
from tests.search.browser import is_blank, rendered_dom, screenshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    cfg = tiny_sweep_conf(root, "n_trials=3", "pruner=none")
    study = sweep(cfg)
    first = study.trials[0]  # and a trial stopped at its first validation, as a pruner would leave it
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params=first.params, distributions=first.distributions,
        intermediate_values={10: 9.0}, user_attrs={"pruned_reason": "pruned by HyperbandPruner at step 10"}))
    return root, cfg, study


def _study_page(app, study: optuna.Study) -> dict:
    """What optuna-dashboard's WSGI ``app`` answers for ``study``'s page, as JSON."""
    import wsgiref.util

    environ = {"PATH_INFO": f"/api/studies/{study._study_id}", "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    return json.loads(b"".join(app(environ, lambda status, headers, exc_info=None: None)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trials_carry_their_architecture_and_the_best_its_attention_map(swept):
    root, cfg, study = swept
    storage = optuna.storages.RDBStorage(str(cfg.storage.url))
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        names = {m.filename for m in get_all_artifact_meta(trial, storage=storage)}
        assert "arch.yaml" in names
    best = get_all_artifact_meta(study.best_trial, storage=storage)
    (meta,) = [m for m in best if m.filename == "attention.png" and m.mimetype == "image/png"]
    from PIL import Image

    image = Image.open(root / "artifacts" / meta.artifact_id)
    arch = architecture(study, study.best_trial)
    heads = max(layer.attention.n_heads for stack in arch.stacks.values() for layer in stack.layers)
    assert image.size[0] >= 250 * heads and image.size[1] >= 250  # panels big enough to read


def test_the_dashboard_serves_the_study_on_loopback_and_renders_it(swept, tmp_path):
    root, cfg, study = swept
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkvsearch.search.cli", "dashboard", f"port={port}", f"run_root={root}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/dashboard" in line, line
        data = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    data = json.load(response)
                break
            except OSError:
                time.sleep(0.2)
        assert data is not None, "the dashboard never answered"
        (summary,) = data["study_summaries"]
        assert summary["study_name"] == study.study_name
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as response:
            detail = json.load(response)
        assert len(detail["trials"]) == len(study.trials) == 4  # three trained, one added as pruned
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", port)
        dom = rendered_dom(f"http://127.0.0.1:{port}/dashboard/studies/{summary['study_id']}")
        shot = screenshot(f"http://127.0.0.1:{port}/dashboard/studies/{summary['study_id']}", tmp_path / "dashboard.png")
        assert not is_blank(shot)
        assert study.study_name in dom
        assert len(re.findall(r'class="main-svg"', dom)) >= 2, "no plot was rendered"
        assert "val_loss" in dom
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def _serve(root, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkvsearch.search.cli", "dashboard", f"port={port}", f"run_root={root}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for _ in range(150):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the dashboard never answered: {proc.stdout.read()}")


def _delete(port: int, study_id: int) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies/{study_id}", method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_dashboard_refuses_an_unauthenticated_delete_on_loopback_unless_writes_are_asked_for(tmp_path):
    sweep(tiny_sweep_conf(tmp_path, "n_trials=1", "pruner=none", "trainer.max_steps=10"))
    storage = f"sqlite:///{tmp_path}/studies.db"
    study_id = optuna.load_study(study_name="recall-tiny", storage=storage)._study_id
    port = _free_port()
    proc = _serve(tmp_path, port)  # the default, on 127.0.0.1: every user of a shared node reaches it
    try:
        assert _delete(port, study_id) == 403
        assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["recall-tiny"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "read-only" in out
    proc = _serve(tmp_path, port, "read_only=false")  # asked for: writes allowed
    try:
        assert _delete(port, study_id) == 204
        assert optuna.get_all_study_summaries(storage) == []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_serving_beyond_loopback_warns_and_is_read_only_by_default():
    from qkvsearch.search.base.network import is_loopback
    from qkvsearch.search.commands.dashboard import exposure_warning

    assert exposure_warning("127.0.0.1", writable=True) is None and is_loopback("::1") and is_loopback("localhost")
    warning = exposure_warning("0.0.0.0", writable=True)
    assert "can delete studies" in warning and "ssh -L 8080:127.0.0.1:8080" in warning
    assert "can read every study" in exposure_warning("10.1.2.3", writable=False)
    assert compose_conf("dashboard", ["host=0.0.0.0"]).read_only is True


def test_the_report_is_self_contained_and_renders_its_plots(swept, tmp_path):
    root, cfg, study = swept
    out = report(compose_conf("report", [f"run_root={root}", f"out={tmp_path / 'r.html'}"]))
    text = out.read_text()
    assert not re.search(r"<script[^>]+src=", text), "the report references an external script"
    assert not re.search(r"<link[^>]+href=\"?https?:", text)
    dom = rendered_dom(out.as_uri())
    assert f"qkvsearch study {study.study_name}" in dom
    for heading in ("Optimisation history", "Parallel coordinates", "Intermediate values", "Best architecture", "Attention weights"):
        assert heading in dom
    shot = screenshot(out.as_uri(), tmp_path / "report.png")
    assert shot.size[0] >= 1200 and not is_blank(shot)
    assert '"updatemenus"' in text and "self-attention, head 0" in text  # the layer/head selector
    assert "computed from only 3 complete trials" in text  # importances from a handful of trials say so
    assert "trial 3 (pruned)" in text  # the pruned trial's curve is drawn and named so
    assert len(re.findall(r'class="main-svg"', dom)) >= 5
    assert len(re.findall(r'class="[^"]*js-plotly-plot', dom)) >= 5
    # the best architecture per layer, as a table, with what differs from the runner-up marked
    assert "<th>kv heads</th>" in dom and "decoder 0" in dom
    best, runner_up = sorted((t for t in study.get_trials() if t.state.name == "COMPLETE"), key=lambda t: t.value)[:2]
    assert best.user_attrs["arch_hash"] != runner_up.user_attrs["arch_hash"]  # seed 0 samples two distinct ones
    assert 'class="differs"' in dom and "runner-up:" in dom
    # how fast each trial trained: a CPU has no known peak, so MFU and peak memory are dashes
    assert "<th>tokens/s</th><th>MFU</th><th>peak memory</th>" in text
    assert f"<td>{best.user_attrs['train_tokens_per_s']:,.0f}</td><td>-</td><td>-</td>" in text


def test_speed_cells_show_mfu_and_peak_memory_where_a_gpu_recorded_them():
    from qkvsearch.search.commands.report import speed_cells

    assert speed_cells({"train_tokens_per_s": 123456.7, "mfu": 0.4123, "peak_memory_mb": 2048.0}) == (
        "<td>123,457</td><td>41.2%</td><td>2,048 MB</td>")


def test_reports_of_empty_and_failed_only_studies_say_so():
    empty = optuna.create_study(study_name="empty")
    assert "the study has no trials yet" in render(empty)
    failed = optuna.create_study(study_name="failed")
    trial = failed.ask()
    trial.set_user_attr("fail_reason", "RuntimeError: boom")
    failed.tell(trial, state=optuna.trial.TrialState.FAIL)
    page = render(failed)
    assert "no trial has completed" in page and "RuntimeError: boom" in page and "no complete trial yet" in page


def test_a_large_studys_plots_draw_the_latest_trials_and_the_best_and_say_so(monkeypatch):
    from qkvsearch.search.commands import report as report_module

    monkeypatch.setattr(report_module, "PLOT_LIMIT", 6)
    monkeypatch.setattr(report_module, "PLOT_BEST", 2)
    study = optuna.create_study(study_name="large")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i in range(20):  # the best two early (1 and 4), a pruned one among the latest
        state = optuna.trial.TrialState.PRUNED if i == 17 else optuna.trial.TrialState.COMPLETE
        value = {1: 0.01, 4: 0.02}.get(i, 1.0 + i)
        study.add_trial(optuna.trial.create_trial(state=state, value=value, params={"x": i / 20}, distributions=x,
                                                  intermediate_values={0: value + 1, 1: value}))
    trials, note = report_module.plotted(study)
    assert [t.number for t in trials] == [1, 4, 14, 15, 16, 17, 18, 19]
    assert "latest 6 of 20 finished trials and the 2 best" in note
    figure = report_module.intermediate_figure(trials, "val_loss")
    assert [trace.name for trace in figure.data][:3] == ["trial 1", "trial 4", "trial 14"]
    assert "trial 17 (pruned)" in [trace.name for trace in figure.data] and len(figure.data) == 8
    page = "".join(report_module.history_sections(study))
    assert page.count("latest 6 of 20 finished trials") == 3  # importances, parallel coordinates, curves
    monkeypatch.setattr(report_module, "PLOT_LIMIT", 20)  # a study within the limit: every trial, no note
    trials, note = report_module.plotted(study)
    assert len(trials) == 20 and note == ""


def test_no_study_is_a_clear_error(tmp_path):
    from qkvsearch.search.commands.dashboard import serve

    with pytest.raises(ValueError, match=r"no storage at .*studies.db: run `qkv sweep` first"):
        serve(compose_conf("dashboard", [f"run_root={tmp_path}"]))
    with pytest.raises(ValueError, match=r"no storage at"):
        report(compose_conf("report", [f"run_root={tmp_path}"]))
    assert list(tmp_path.iterdir()) == []  # looking for a study creates no storage
    empty = compose_conf("sweep", [f"run_root={tmp_path}"]).storage
    open_storage(empty)  # a storage without studies
    with pytest.raises(ValueError, match=r"no study found in sqlite:///.*run `qkv sweep` first"):
        serve(compose_conf("dashboard", [f"run_root={tmp_path}"]))


def test_the_dashboard_starts_without_reading_trials_and_a_refresh_reads_only_what_changed(tmp_path, monkeypatch):
    """`qkv dashboard` prints its address before any trial is read (Optuna's study summaries
    read every trial of every study); its storage keeps Optuna's cache of finished trials,
    filled in the background, so a page refreshed while a sweep runs reads the new trials only."""

    from qkvsearch.search.commands.dashboard import dashboard_app
    from qkvsearch.search.study import reader

    storage = open_storage(compose_conf("sweep", [f"run_root={tmp_path}"]).storage)
    study = optuna.create_study(study_name="watched", storage=storage)
    study.add_trials([optuna.trial.create_trial(value=float(i)) for i in range(40)])
    reads = []
    real = reader.ChunkedRDBStorage._get_trials

    def counted(self, *args, **kwargs):
        trials = real(self, *args, **kwargs)
        reads.append(len(trials))
        return trials
    monkeypatch.setattr(reader.ChunkedRDBStorage, "_get_trials", counted)

    app, warming = dashboard_app(storage)
    warming.join(timeout=60)
    assert sum(reads) == 40  # the background read: each trial once
    reads.clear()
    assert len(_study_page(app, study)["trials"]) == 40 and sum(reads) == 0  # the first page: read already
    study.add_trial(optuna.trial.create_trial(value=99.0))  # the sweep goes on
    time.sleep(2.1)  # past optuna-dashboard's own cache of a small study (2 s)
    assert len(_study_page(app, study)["trials"]) == 41 and sum(reads) == 1  # only the new trial read


def test_a_command_without_a_study_name_takes_the_latest_sweep_reading_one_trial_per_study(tmp_path, monkeypatch):
    """The latest study is the one whose first trial started last (not the one made last);
    finding it and checking a name read one trial a study, not every trial of every study."""
    import datetime

    from qkvsearch.search.study import reader
    from qkvsearch.search.study.storage import latest_study, load_named_study

    cfg = compose_conf("report", [f"run_root={tmp_path}"])
    storage = open_storage(cfg.storage)
    now = datetime.datetime.now()
    sweeps = (("newer-sweep", 1), ("older-sweep-made-last", 3))  # made in this order; run days apart
    for name, _ in sweeps:
        optuna.create_study(study_name=name, storage=storage).add_trials(
            [optuna.trial.create_trial(value=float(i)) for i in range(30)])
    from optuna.storages._rdb import models
    with storage.scoped_session() as session:  # the trials' starts, as sweeps days apart leave them
        for name, days_ago in sweeps:
            study_id = storage.get_study_id_from_name(name)
            for row in session.query(models.TrialModel).filter(models.TrialModel.study_id == study_id):
                row.datetime_start = now - datetime.timedelta(days=days_ago) + datetime.timedelta(seconds=row.number)
        session.commit()
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "empty-study")
    reads = []
    monkeypatch.setattr(reader.ChunkedRDBStorage, "_get_trials",
                        lambda self, *a, **k: reads.append(1) or pytest.fail("read a study's trials"))
    assert latest_study(storage) == "newer-sweep"
    assert load_named_study(cfg.storage, None).study_name == "newer-sweep" and reads == []


def test_a_study_page_does_not_scan_the_stored_architectures_once_per_trial(tmp_path, monkeypatch):
    """optuna-dashboard looks for each trial's artifacts among all of the study's system
    attributes, where a sweep keeps one entry per distinct architecture: the page it serves
    must not pay trials x architectures for that, and must say what it said before (a trial's
    note and artifacts included)."""

    import optuna_dashboard
    from optuna_dashboard.artifact import _backend

    from qkvsearch.search.commands.dashboard import dashboard_app

    storage = open_storage(compose_conf("sweep", [f"run_root={tmp_path}"]).storage)
    study = optuna.create_study(study_name="many-architectures", storage=storage)
    study.add_trials([optuna.trial.create_trial(value=float(i)) for i in range(40)])
    for i in range(200):
        storage.set_study_system_attr(study._study_id, f"{ARCH_PREFIX}{i:04x}", {"decoder": {"n_heads": i}})
    first = study.trials[0]._trial_id  # a note and an artifact, as optuna-dashboard keeps them
    storage.set_study_system_attr(study._study_id, f"dashboard:{first}:note_str:0", "a note")
    storage.set_study_system_attr(study._study_id, f"dashboard:{first}:note_ver", 1)
    meta = {"artifact_id": "abc", "filename": "plot.png", "mimetype": "image/png", "encoding": None}
    storage.set_study_system_attr(study._study_id, f"dashboard:artifacts:{first}:abc", json.dumps(meta))
    checked = []
    real = _backend._dashboard_artifact_prefix
    monkeypatch.setattr(_backend, "_dashboard_artifact_prefix", lambda trial_id: checked.append(1) or real(trial_id))

    app, warming = dashboard_app(storage)
    warming.join(timeout=60)
    ours = _study_page(app, study)
    assert len(checked) <= 40 * 5  # each trial checks the few attributes that are not architectures
    checked.clear()
    assert ours == _study_page(optuna_dashboard.wsgi(storage), study) and len(checked) > 40 * 200  # the same page, bare
    assert ours["trials"][0]["artifacts"] == [meta] and ours["trials"][0]["note"]["body"] == "a note"
    assert storage.get_study_system_attrs(study._study_id).keys() >= {f"{ARCH_PREFIX}{i:04x}" for i in range(200)}


def test_a_writable_dashboard_refuses_a_rename_that_would_drop_the_stored_architectures(tmp_path):
    """optuna-dashboard's rename copies a study's trials, user attributes and notes, not its
    system attributes: the architectures a sweep stores there would be gone, and with them
    `qkv export`. A dashboard served with writes allowed refuses the rename and keeps deletes."""
    import io
    import wsgiref.util

    import optuna_dashboard

    from qkvsearch.search.commands.dashboard import dashboard_app, guarded

    storage = open_storage(compose_conf("sweep", [f"run_root={tmp_path}"]).storage)

    def swept(name: str) -> optuna.Study:
        study = optuna.create_study(study_name=name, storage=storage)
        study.add_trials([optuna.trial.create_trial(value=1.0)])
        storage.set_study_system_attr(study._study_id, f"{ARCH_PREFIX}abc", {"decoder": {"n_heads": 4}})
        return study

    def rename(app, study: optuna.Study, to: str) -> str:
        body = json.dumps({"study_name": to}).encode()
        environ = {"PATH_INFO": f"/api/studies/{study._study_id}/rename", "REQUEST_METHOD": "POST",
                   "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
        wsgiref.util.setup_testing_defaults(environ)
        status = []
        b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        return status[0]

    assert rename(optuna_dashboard.wsgi(storage), swept("bare"), "bare-renamed").startswith("201")  # what it does
    renamed = optuna.load_study(study_name="bare-renamed", storage=storage)
    assert f"{ARCH_PREFIX}abc" not in storage.get_study_system_attrs(renamed._study_id) and len(renamed.trials) == 1  # the architecture lost
    study = swept("kept")
    app, _ = dashboard_app(storage)
    assert rename(guarded(app, writable=True), study, "kept-renamed").startswith("403")
    assert storage.get_study_system_attrs(storage.get_study_id_from_name("kept"))[f"{ARCH_PREFIX}abc"]["decoder"]
    assert "kept-renamed" not in {s.study_name for s in storage.get_all_studies()}
