"""Optuna artifacts of a sweep: each trial's architecture, and attention maps of the best.

Artifacts live in a ``FileSystemArtifactStore`` beside the storage (``artifacts`` in the
config); ``qkv dashboard`` serves the same store, so they show next to their trials.
Optuna only lets a running trial take artifacts, so the sweep attaches them before it
tells the study the trial's result.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from qkvsearch.models import capture_attention
from qkvsearch.search.base.keys import DUPLICATE_OF
from qkvsearch.search.inspect.selection import direction_sign
from qkvsearch.tasks.base import model_inputs

ATTENTION_FILE = "attention.png"


def open_store(path: str | pathlib.Path) -> FileSystemArtifactStore:
    """The artifact store at ``path`` (created if missing)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def would_be_best(study: optuna.Study, values: list[float]) -> bool:
    """True when a trial with ``values`` would be the best (or on the Pareto front) once told."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    signs = [direction_sign(study, i) for i in range(len(study.directions))]
    mine = [s * v for s, v in zip(signs, values, strict=True)]
    for other in complete:
        theirs = [s * v for s, v in zip(signs, other.values, strict=True)]
        if len(mine) == 1 and theirs[0] <= mine[0]:
            return False
        if len(mine) > 1 and all(t <= m for t, m in zip(theirs, mine, strict=True)) and theirs != mine:
            return False
    return True


def attention_weights(model: torch.nn.Module, kind: str, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every attention layer's weights, ``[heads, q, k]``, for the first example of ``sample``."""
    model = model.eval()
    with torch.no_grad(), capture_attention(model) as weights:
        model(*model_inputs(kind, {k: v[:1] for k, v in sample.items()}))
    return {name: w[0].float().cpu() for name, w in weights.items()}


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """One layer's attention weights ``[heads, q, k]`` with the tokens on each axis."""

    name: str
    weights: torch.Tensor
    queries: list[str]
    keys: list[str]


def _layer_title(name: str) -> str:
    """``decoder.layers.0.cross_attention`` -> ``decoder layer 0 cross-attention``."""
    parts = name.replace("stack.", "decoder." if "cross" not in name else "").split(".")
    return " ".join(p.replace("layers", "layer").replace("_attention", "-attention") for p in parts)


def attention_maps(model: torch.nn.Module, task: Any) -> list[AttentionMap]:
    """Every layer's attention on the task's first validation example, with its tokens
    (the task's ``token_text`` where it has one, else the token ids)."""
    sample = {k: v[:1] for k, v in task.sample_batch(1).items()}
    weights = attention_weights(model, task.kind, sample)
    label = getattr(task, "token_text", str)
    source = [label(int(i)) for i in sample["src" if task.kind == "seq2seq" else "tokens"][0]]
    target = [label(int(i)) for i in sample["tgt_in"][0]] if task.kind == "seq2seq" else source
    maps = []
    for name, w in weights.items():
        decoding = task.kind == "seq2seq" and name.startswith("decoder")
        queries = target if decoding else source
        keys = source if "cross" in name or not decoding else target
        maps.append(AttentionMap(_layer_title(name), w, queries[: w.shape[1]], keys[: w.shape[2]]))
    return maps


def render_attention_png(maps: list[AttentionMap], path: pathlib.Path, title: str) -> pathlib.Path:
    """A grid of square heatmaps, one row per layer and one column per head, with the
    tokens on the axes where they fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(m.weights.shape[0] for m in maps)
    panel = 2.6
    figure, axes = plt.subplots(len(maps), columns, figsize=(panel * columns + 0.6, panel * len(maps) + 0.8), squeeze=False)
    for r, m in enumerate(maps):
        for h in range(columns):
            axis = axes[r][h]
            if h >= m.weights.shape[0]:
                axis.axis("off")
                continue
            axis.imshow(m.weights[h].numpy(), cmap="viridis", vmin=0.0, vmax=float(m.weights[h].max()) or 1.0,
                        interpolation="nearest", aspect="equal")
            for ticks, labels, setter in ((axis.set_xticks, m.keys, axis.set_xticklabels), (axis.set_yticks, m.queries, axis.set_yticklabels)):
                if len(labels) <= 40:
                    ticks(range(len(labels)))
                    setter(labels, fontsize=5, fontfamily="monospace")
                else:
                    ticks([])
            axis.set_title(f"{m.name}, head {h}", fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def attach_architecture(store: FileSystemArtifactStore, trial: optuna.Trial, arch_file: pathlib.Path) -> None:
    """Attaches the trial's ``arch.yaml`` to the (running) trial."""
    upload_artifact(artifact_store=store, file_path=str(arch_file), study_or_trial=trial, mimetype="text/yaml")


def attach_attention(store: FileSystemArtifactStore, trial: optuna.Trial, model: torch.nn.Module, task: Any) -> None:
    """Renders the model's attention on the task's first validation example; attaches it."""
    maps = attention_maps(model, task)
    with tempfile.TemporaryDirectory() as scratch:
        path = render_attention_png(maps, pathlib.Path(scratch) / ATTENTION_FILE,
                                    f"trial {trial.number}: attention on a validation example (rows: queries, columns: keys)")
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype="image/png")


def study_run_dir(study: optuna.Study, run_root: str | pathlib.Path) -> pathlib.Path:
    """The study's run folder: ``run_root/<study>/<uid>`` (relative to ``run_root``, so a
    copied ``runs/`` folder still finds its trials; the uid keeps two studies of one name
    in two storages apart). Studies made before the uid keep their recorded folder."""
    attrs = study.user_attrs
    if "run_subdir" in attrs:
        return pathlib.Path(run_root) / attrs["run_subdir"]
    if "run_dir" in attrs:
        return pathlib.Path(attrs["run_dir"])
    return pathlib.Path(run_root) / study.study_name


def trial_dir(run_dir: pathlib.Path, number: int) -> pathlib.Path:
    """Where a trial keeps its architecture, best weights and metrics."""
    return run_dir / "trials" / f"{number:05d}"


def trial_weights(study: optuna.Study, trial: optuna.trial.FrozenTrial, run_root: str | pathlib.Path) -> pathlib.Path:
    """The file of a trial's best weights (a duplicate's are its original's)."""
    return trial_dir(study_run_dir(study, run_root), trial.user_attrs.get(DUPLICATE_OF, trial.number)) / "model.safetensors"
