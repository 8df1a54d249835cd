"""What a study is and where its files live: names, storages, moved folders, its task, its journal."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import optuna
import pytest
import torch
from safetensors.torch import save_file

from qkvsearch.models import ArchConfig
from qkvsearch.search.base.settings import check_study_name, check_sweep
from qkvsearch.search.base.weights import load_trained
from qkvsearch.search.commands.export import export
from qkvsearch.search.inspect.artifacts import study_run_dir, trial_weights
from qkvsearch.search.study.prepare import build_task, prepare, task_of_study
from qkvsearch.search.study.storage import open_storage
from qkvsearch.search.study.sweep import sweep
from tests.conftest import SWEEP_CMD, TEST_SWEEP, compose_conf, tiny_sweep_conf

State = optuna.trial.TrialState

HOSTILE_NAMES = [
    ("../../elsewhere", r"not a plain name"),
    ("/some/dir/x", r"not a plain name"),
    ("a/b", r"not a plain name"),
    ("..", r"not a plain name"),
    ("", r"not a plain name"),
    ("name with spaces", r"not a plain name"),
    (2024, r"study_name: 2024 is a int, not a name .* study_name=run2024"),
    (1.5, r"is a float, not a name"),
]


@pytest.mark.parametrize(("name", "message"), HOSTILE_NAMES)
def test_a_study_name_that_is_not_a_plain_name_is_refused(name, message):
    with pytest.raises(ValueError, match=message):
        check_study_name(name)


@pytest.mark.parametrize(("name", "message"), HOSTILE_NAMES[:3])
def test_a_sweep_with_a_hostile_name_writes_nothing(name, message, tmp_path):
    run_root = tmp_path / "runs" / "deep"
    cfg = tiny_sweep_conf(run_root, f"study_name={name}")
    with pytest.raises(ValueError, match=message):
        sweep(cfg)
    assert not (tmp_path / "elsewhere").exists() and not pathlib.Path("/some/dir/x").exists()
    assert not run_root.exists()  # refused before anything was made


@pytest.mark.parametrize(("name", "message"), [("2024", "study_name: 2024 is a int"), ("../../elsewhere", "study_name: '../../elsewhere' is not a plain name")])
def test_the_cli_refuses_a_bad_study_name_with_status_2_and_writes_nothing(name, message, tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    result = subprocess.run([*SWEEP_CMD, f"study_name={name}", *TEST_SWEEP], capture_output=True,
                            text=True, timeout=120, cwd=work)
    assert result.returncode == 2
    assert f"qkv: error: {message}" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [pathlib.Path("a"), pathlib.Path("a/b")]


def test_export_refuses_a_study_name_that_escapes_exports(tmp_path):
    with pytest.raises(ValueError, match=r"not a plain name"):
        export(compose_conf("export", [f"run_root={tmp_path}", "study_name=../../x"]))


def test_bad_sweep_settings_name_the_field():
    for override, message in (("max_retries=-1", r"max_retries must be an integer >= 0, got -1"),
                              ("worker_index=-2", r"worker_index must be null or an integer >= 0, got -2")):
        with pytest.raises(ValueError, match=message):
            check_sweep(compose_conf("sweep", [override]))


def test_weights_of_another_architecture_are_refused(tmp_path):
    small = ArchConfig.from_dict({"kind": "decoder", "vocab_size": 16, "max_seq_len": 8, "d_model": 16,
                                  "decoder": {"n_layers": 1, "attention": {"n_heads": 2, "masks": ["causal"]}}})
    other = ArchConfig.from_dict({**small.to_dict(), "vocab_size": 17})
    from qkvsearch.models import build_model

    state = {k: v.contiguous() for k, v in build_model(other).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"arch_hash": other.fingerprint()})
    with pytest.raises(ValueError, match=r"holds weights of architecture .* not of this trial's"):
        load_trained(small, tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in build_model(small).state_dict().items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"architecture unknown"):
        load_trained(small, tmp_path / "x.safetensors")
    assert isinstance(load_trained(other, tmp_path / "w.safetensors"), torch.nn.Module)


def _unfused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as qkvsearch saved it before the projections were fused: q_proj, k_proj
    and v_proj in every attention layer."""
    state = {}
    for name, value in model.state_dict().items():
        prefix, _, kind = name.rpartition(".")
        owner = model.get_submodule(prefix.rsplit(".", 1)[0]) if ".project." in name else None
        if owner is None:
            state[name] = value.contiguous()
            continue
        layer = prefix.rsplit(".project.", 1)[0]
        if prefix.endswith(".qkv"):
            parts = dict(zip("qkv", value.split(owner.sizes), strict=True))
        elif prefix.endswith(".kv"):
            parts = dict(zip("kv", value.split(owner.sizes), strict=True))
        else:
            parts = {"q": value}
        for letter, part in parts.items():
            state[f"{layer}.{letter}_proj.{kind}"] = part.contiguous()
    return state


def test_weights_saved_before_the_projections_were_fused_still_load(tmp_path):
    arch = ArchConfig.from_dict({
        "kind": "encoder_decoder", "vocab_size": 16, "max_seq_len": 8, "d_model": 16,
        "encoder": {"n_layers": 1, "attention": {"n_heads": 4, "n_kv_heads": 2, "d_k": 6, "d_v": 2, "bias": True}},
        "decoder": {"n_layers": 1, "attention": {"n_heads": 2, "masks": ["causal"], "bias": True},
                    "cross_attention": {"n_heads": 4, "n_kv_heads": 1, "d_k": 4, "d_v": 8, "bias": True}},
    })
    from qkvsearch.models import build_model

    torch.manual_seed(0)
    model = build_model(arch).eval()
    old = _unfused(model)
    assert "decoder.layers.0.cross_attention.k_proj.bias" in old and not any(".project." in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"arch_hash": arch.fingerprint()})
    loaded = load_trained(arch, tmp_path / "old.safetensors")
    src, tgt = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 5))
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=0, atol=0)


@pytest.mark.slow
def test_two_studies_of_one_name_in_two_storages_keep_their_own_weights(tmp_path):
    sqlite = sweep(tiny_sweep_conf(tmp_path, "study_name=twin", "n_trials=1", "pruner=none"))
    journal = sweep(tiny_sweep_conf(tmp_path, "study_name=twin", "n_trials=1", "pruner=none", "storage=journal",
                                    "sampler.seed=7"))
    assert study_run_dir(sqlite, tmp_path) != study_run_dir(journal, tmp_path)
    for study, storage in ((sqlite, []), (journal, ["storage=journal"])):
        out = export(compose_conf("export", [f"run_root={tmp_path}", "study_name=twin", f"out={tmp_path}/out",
                                             "overwrite=true", *storage]))
        exported = ArchConfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
        assert exported.fingerprint() == study.best_trial.user_attrs["arch_hash"]


@pytest.mark.slow
def test_a_moved_runs_folder_still_exports(tmp_path):
    first = tmp_path / "a" / "runs"
    sweep(tiny_sweep_conf(first, "study_name=moved", "n_trials=1", "pruner=none"))
    moved = tmp_path / "b" / "runs"
    shutil.move(str(first), str(moved))
    shutil.rmtree(tmp_path / "a")
    study = optuna.load_study(study_name="moved", storage=f"sqlite:///{moved}/studies.db")
    assert trial_weights(study, study.best_trial, moved).is_relative_to(moved)
    out = export(compose_conf("export", [f"run_root={moved}", "study_name=moved", f"out={tmp_path}/out"]))
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_study_carries_its_task_and_a_different_task_is_refused(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "study_name=override", "n_trials=1", "task.data.n_pairs=3", "pruner=none")
    study = sweep(cfg)
    rebuilt = task_of_study(study)
    assert rebuilt.seq_len == build_task(cfg).seq_len
    default = compose_conf("sweep", ["task=recall"])
    assert build_task(default).seq_len != rebuilt.seq_len  # the default task would be the wrong one
    assert study.user_attrs["code_version"].startswith("0.1.0")
    with pytest.raises(ValueError, match=r"was made with task config .* choose another study_name"):
        prepare(tiny_sweep_conf(tmp_path, "study_name=override", "task.data.n_pairs=5"))


def test_two_processes_of_one_command_draw_different_samples(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "sampler=random", "study_name=terminals")
    first, second = prepare(cfg), prepare(tiny_sweep_conf(tmp_path, "sampler=random", "study_name=terminals"))
    assert (first.worker.index, second.worker.index) == (0, 1)
    a, b = first.worker.study.ask(), second.worker.study.ask()
    assert first.space.suggest(a).fingerprint() != second.space.suggest(b).fingerprint()
    pinned = prepare(tiny_sweep_conf(tmp_path, "sampler=random", "study_name=terminals", "worker_index=0"))
    assert pinned.worker.index == 0  # a pinned index gives the same stream as the first process


@pytest.mark.slow
def test_a_truncated_journal_is_repaired_before_the_next_sweep_writes(tmp_path, capfd):
    # the cut loses the last record (trial 0's completion): that trial goes stale and is retried
    args = ["storage=journal", "pruner=none", "study_name=cut", "storage.heartbeat_s=1", "storage.grace_s=3"]
    sweep(tiny_sweep_conf(tmp_path, *args, "n_trials=1"))
    journal = tmp_path / "studies.journal"
    size = journal.stat().st_size
    with open(journal, "r+b") as handle:  # what a full disk or a power loss leaves: a partial last line
        handle.truncate(size - 37)
    sweep(tiny_sweep_conf(tmp_path, *args, "n_trials=2"))
    assert "ended in a partial record (" in capfd.readouterr().err
    assert journal.read_bytes().endswith(b"\n")
    assert list(tmp_path.glob("studies.journal.partial-*"))
    storage = open_storage(compose_conf("sweep", [f"run_root={tmp_path}", "storage=journal"]).storage)
    trials = optuna.load_study(study_name="cut", storage=storage).get_trials()
    assert len(trials) >= 2 and all(t.state.is_finished() for t in trials)
