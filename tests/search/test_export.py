"""Exported folders run without qkvsearch and match; trial selection; bad input."""

from __future__ import annotations

import ast
import os

import optuna
import pytest
import torch

from qkvsearch.models import MASKS, POSITIONS, SCALINGS, ArchConfig, build_model
from qkvsearch.search.commands.export import export
from qkvsearch.search.export import ExportError
from qkvsearch.search.export.check import check_folder
from qkvsearch.search.export.codegen import generate_model_source
from qkvsearch.search.inspect.artifacts import trial_weights
from qkvsearch.search.inspect.choose import select_trial
from qkvsearch.search.study.sweep import sweep
from tests.conftest import compose_conf, tiny_sweep_conf


def _stack(layers: list[dict], **extra) -> dict:
    return {"n_layers": len(layers), "layers": layers, **extra}


def _attn(n_heads=2, n_kv=1, d_k=4, d_v=4, scaling="sqrt_dk", masks=(), bias=False) -> dict:
    return {"n_heads": n_heads, "n_kv_heads": n_kv, "d_k": d_k, "d_v": d_v, "scaling": scaling, "masks": list(masks), "bias": bias}


WINDOW = {"name": "sliding_window", "window": 3}
PREFIX = {"name": "prefix_lm", "prefix_len": 4}
ARCHS = {
    "decoder-rotary-heterogeneous": {
        "kind": "decoder", "positions": "rotary", "norm": "rmsnorm", "tie_embeddings": True,
        "decoder": _stack([
            {"attention": _attn(4, 2, 6, 4, "qk_norm", ["causal", WINDOW]), "ffn": {"name": "swiglu", "d_ff": 20}},
            {"attention": _attn(2, 2, 4, 6, "learned_temperature", ["causal", "padding"]), "ffn": {"name": "squared_relu", "d_ff": 12}},
            {"attention": _attn(3, 1, 8, 2, "inv_dk", [PREFIX]), "ffn": {"name": "gelu", "d_ff": 9, "bias": True}},
        ]),
    },
    "decoder-alibi-post-norm": {
        "kind": "decoder", "positions": "alibi", "norm_placement": "post",
        "decoder": _stack([{"attention": _attn(4, 4, 4, 4, "none", ["causal"], bias=True), "ffn": {"name": "relu", "d_ff": 16}}] * 2),
    },
    "encoder-learned-classifier": {
        "kind": "encoder", "positions": "learned", "head": {"name": "classifier", "n_classes": 3, "pooling": "mean"},
        "encoder": _stack([{"attention": _attn(2, 2, 8, 8, "sqrt_dk", ["padding", WINDOW]), "ffn": {"name": "gelu", "d_ff": 24}},
                           {"attention": _attn(2, 1, 8, 8, "qk_norm", ["none"]), "ffn": {"name": "swiglu", "d_ff": 24}}]),
    },
    "encoder-sinusoidal-tagger": {
        "kind": "encoder", "positions": "sinusoidal", "head": {"name": "token_classifier", "n_classes": 5},
        "encoder": _stack([{"attention": _attn(2, 2, 4, 4, "learned_temperature", ["padding"]), "ffn": {"name": "relu", "d_ff": 8}}]),
    },
    "encoder-decoder-none-positions": {
        "kind": "encoder_decoder", "positions": "none", "tie_embeddings": True,
        "encoder": _stack([{"attention": _attn(2, 2, 4, 4, "sqrt_dk", ["padding"]), "ffn": {"name": "gelu", "d_ff": 16}}]),
        "decoder": _stack([{"attention": _attn(2, 1, 4, 4, "qk_norm", ["causal", "padding"]),
                            "cross_attention": _attn(4, 2, 2, 3, "inv_dk", ["padding"]), "ffn": {"name": "swiglu", "d_ff": 16}}] * 2),
    },
}


def _arch(name: str) -> ArchConfig:
    return ArchConfig.from_dict({"vocab_size": 13, "max_seq_len": 20, "d_model": 12, **ARCHS[name]})


def test_the_export_architectures_cover_every_registered_component():
    used = {"scaling": set(), "masks": set(), "positions": set()}
    for name in ARCHS:
        arch = _arch(name)
        used["positions"].add(arch.positions.name)
        for stack in arch.stacks.values():
            for layer in stack.layers:
                for attention in filter(None, (layer.attention, layer.cross_attention)):
                    used["scaling"].add(attention.scaling.name)
                    used["masks"] |= {m.name for m in attention.masks}
    assert used == {"scaling": set(SCALINGS.names()), "masks": set(MASKS.names()), "positions": set(POSITIONS.names())}


@pytest.mark.parametrize("name", list(ARCHS))
def test_exported_source_runs_without_qkvsearch_and_matches(name, tmp_path):
    arch = _arch(name)
    torch.manual_seed(0)
    model = build_model(arch)
    with torch.no_grad():  # make every parameter matter, norms and temperatures included
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    from safetensors.torch import save_file

    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    source = generate_model_source(arch)
    (tmp_path / "model.py").write_text(source)
    tree = ast.parse(source)
    imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imports += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert {i.split(".")[0] for i in imports} <= {"__future__", "dataclasses", "json", "math", "os", "pathlib", "collections", "typing", "torch"}
    report = check_folder(tmp_path, model, arch)
    assert report["modules"] == [] and report["max_abs_difference"] < 1e-5


def test_a_wrong_weight_is_caught_and_named(tmp_path):
    arch = _arch("decoder-alibi-post-norm")
    model = build_model(arch)
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["stack.layers.1.feedforward.up.weight"] += torch.randn_like(state["stack.layers.1.feedforward.up.weight"])
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.py").write_text(generate_model_source(arch))
    with pytest.raises(ExportError, match=r"outputs differ by up to"):
        check_folder(tmp_path, model, arch)


def _study_with(values: list[tuple[float, float]], params: list[int]) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for (loss, size), n in zip(values, params, strict=True):
        study.add_trial(optuna.trial.create_trial(values=[loss, size], user_attrs={"n_params": n}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"pruned_reason": "x"}))
    return study


def _select(study, **rule):
    return select_trial(study, **{"trial": None, "rule": "auto", "within": 0.05, "max_params": None, **rule})


def test_pareto_selection_rules_pick_the_right_trials():
    study = _study_with([(1.00, 900), (1.04, 300), (1.06, 100), (1.30, 50)], [900, 300, 100, 50])
    assert _select(study, rule="best").number == 0
    assert _select(study, rule="smallest_within", within=0.05).number == 1
    assert _select(study, rule="smallest_within", within=0.10).number == 2
    assert _select(study, rule="best_under", max_params=150).number == 2
    assert _select(study, trial=3).number == 3
    with pytest.raises(ValueError, match="several objectives: choose rule="):
        _select(study)
    with pytest.raises(ValueError, match=r"no complete trial has at most 10 parameters \(the smallest has 50\)"):
        _select(study, rule="best_under", max_params=10)
    with pytest.raises(ValueError, match=r"trial 4 of study .* is PRUNED, not COMPLETE x"):
        _select(study, trial=4)
    with pytest.raises(ValueError, match=r"trial 9 does not exist"):
        _select(study, trial=9)
    with pytest.raises(ValueError, match=r"rule: unknown 'fastest'"):
        _select(study, rule="fastest")


@pytest.mark.slow
def test_qkv_export_writes_a_checked_folder_and_refuses_bad_requests(tmp_path):
    cfg = tiny_sweep_conf(tmp_path, "n_trials=2", "pruner=none")
    study = sweep(cfg)
    out = tmp_path / "export"

    def export_cfg(*overrides: str):
        return compose_conf("export", [f"run_root={tmp_path}", f"out={out}", *overrides])

    folder = export(export_cfg("torch_export=true"))
    assert folder == out
    assert {p.name for p in out.iterdir()} == {"model.py", "model.safetensors", "config.yaml", "README.md", "model.pt2"}
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "weights: <run_root>/" in card  # no path of this machine
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # a normal folder, not mkdtemp's 0700
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~umask for f in out.iterdir())
    assert f"trial {study.best_trial.number}" in card and f"{study.best_trial.user_attrs['n_params']:,}" in card
    test_loss = study.user_attrs["test_scores"][str(study.best_trial.number)]["test_loss"]
    assert f"| test_loss (held-out test split, not selected on) | {test_loss:.6g} |" in card
    assert ArchConfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text())).fingerprint() == study.best_trial.user_attrs["arch_hash"]

    with pytest.raises(ValueError, match=r"output folder .* exists; choose out=... or overwrite=true"):
        export(export_cfg())
    with pytest.raises(ValueError, match=r"study 'nope' not found .* studies: recall-tiny"):
        export(export_cfg("study_name=nope", "overwrite=true"))
    with pytest.raises(ValueError, match=r"trial 5 does not exist"):
        export(export_cfg("trial=5", "overwrite=true"))
    weights = trial_weights(study, study.best_trial, tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match=r"has no saved weights at .*retrain=true"):
        export(export_cfg("overwrite=true"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []

    # the task comes from the study (recall with 4 pairs), not from qkv train's defaults
    short = ["trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "show_progress=false"]
    retrained = export(export_cfg("overwrite=true", "retrain=true", "retrain_overrides=[" + ",".join(f"'{o}'" for o in short) + "]"))
    assert "weights: " in (retrained / "README.md").read_text() and "/train/" in (retrained / "README.md").read_text()


@pytest.mark.slow
def test_onnx_export_matches_the_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from qkvsearch.search.export import ExportJob, Provenance
    from qkvsearch.search.export.onnx import Onnx

    arch = _arch("decoder-rotary-heterogeneous")
    model = build_model(arch).eval()
    job = ExportJob(arch, model, Provenance("s", 0, ["val_loss"], [1.0], "t", "sp", "v", "w"))
    (note,) = Onnx().write(job, tmp_path)
    assert (tmp_path / "model.onnx").is_file() and "outputs within" in note


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_model_py_defines_each_class_after_the_classes_it_uses(name):
    tree = ast.parse(generate_model_source(_arch(name)))
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    seen: set[str] = set()
    ours = {c.name for c in classes}
    for cls in classes:
        used = {n.id for n in ast.walk(cls) if isinstance(n, ast.Name) and n.id in ours and n.id != cls.name}
        assert used <= seen, f"{cls.name} comes before {sorted(used - seen)}, which it uses"
        seen.add(cls.name)


class _Payload:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_corrupt_weights_are_one_line_naming_the_file_and_a_pickle_never_runs(tmp_path):
    import pickle
    import subprocess
    import sys

    from qkvsearch.search.inspect.artifacts import trial_weights
    cfg = tiny_sweep_conf(tmp_path, "n_trials=1", "pruner=none")
    study = sweep(cfg)
    weights = trial_weights(study, study.best_trial, tmp_path)
    good = weights.read_bytes()
    marker = tmp_path / "payload-ran"
    for broken in (good[: len(good) // 2], pickle.dumps(_Payload(marker))):
        weights.write_bytes(broken)
        result = subprocess.run([sys.executable, "-m", "qkvsearch.search.cli", "export", f"run_root={tmp_path}",
                                 f"out={tmp_path / 'never'}"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{weights}: not a readable safetensors file" in result.stderr.splitlines()[0]
        assert not marker.exists() and not (tmp_path / "never").exists()
    weights.write_bytes(good)  # an export whose own weights are then damaged says so when it loads them
    out = export(compose_conf("export", [f"run_root={tmp_path}", f"out={tmp_path / 'export'}"]))
    (out / "model.safetensors").write_bytes(good[:100])
    code = f"import sys; sys.path.insert(0, {str(out)!r}); import model; model.load()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "model.safetensors: not a readable safetensors file" in result.stderr.splitlines()[-1]
    assert "UnicodeDecodeError" not in result.stderr
