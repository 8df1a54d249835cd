"""Optuna artifacts of a sweep: each trial's architecture, and attention maps of the best.

Artifacts live in a ``FileSystemArtifactStore`` beside the storage (``artifacts`` in the
config); ``qkv dashboard`` serves the same store, so they show next to their trials.
Optuna only lets a running trial take artifacts, so the sweep attaches them before it
tells the study the trial's result.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from qkvsearch.models import ArchConfig, build_model, capture_attention
from qkvsearch.models.errors import QkvError
from qkvsearch.search.lit import model_inputs

ATTENTION_FILE = "attention.png"


def open_store(path: str | pathlib.Path) -> FileSystemArtifactStore:
    """The artifact store at ``path`` (created if missing)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def would_be_best(study: optuna.Study, values: list[float]) -> bool:
    """True when a trial with ``values`` would be the best (or on the Pareto front) once told."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
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


def render_attention_png(weights: dict[str, torch.Tensor], path: pathlib.Path, title: str) -> pathlib.Path:
    """A grid of heatmaps: one row per attention layer, one column per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(weights.items())
    columns = max(w.shape[0] for _, w in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns + 1, 1.6 * len(rows) + 0.6), squeeze=False)
    for r, (name, w) in enumerate(rows):
        for h in range(columns):
            axis = axes[r][h]
            axis.set_xticks([])
            axis.set_yticks([])
            if h < w.shape[0]:
                axis.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=float(w[h].max()) or 1.0, interpolation="nearest")
            else:
                axis.axis("off")
            if r == 0:
                axis.set_title(f"head {h}", fontsize=8)
        axes[r][0].set_ylabel(name.replace("stack.", "").replace("layers.", "L").replace("_attention", ""), fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def attach_architecture(store: FileSystemArtifactStore, trial: optuna.Trial, arch_file: pathlib.Path) -> None:
    """Attaches the trial's ``arch.yaml`` to the (running) trial."""
    upload_artifact(artifact_store=store, file_path=str(arch_file), study_or_trial=trial, mimetype="text/yaml")


def attach_attention(store: FileSystemArtifactStore, trial: optuna.Trial, model: torch.nn.Module, task: Any) -> None:
    """Renders the model's attention on the task's first validation example; attaches it."""
    weights = attention_weights(model, task.kind, task.sample_batch(1))
    with tempfile.TemporaryDirectory() as scratch:
        path = render_attention_png(weights, pathlib.Path(scratch) / ATTENTION_FILE, f"trial {trial.number}: attention per layer and head")
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
    return trial_dir(study_run_dir(study, run_root), trial.user_attrs.get("duplicate_of", trial.number)) / "model.safetensors"


def load_trained(arch: ArchConfig, weights: pathlib.Path) -> torch.nn.Module:
    """The model with saved weights (no pickle), after checking that the file's
    ``arch_hash`` is this architecture's.

    Raises:
        ValueError: the file is missing, or holds weights of another architecture.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not pathlib.Path(weights).is_file():
        raise QkvError(f"no weights at {weights}")
    with safe_open(str(weights), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("arch_hash")
    if recorded != arch.fingerprint():
        raise QkvError(
            f"{weights} holds weights of architecture {recorded or 'unknown'}, not of this trial's "
            f"({arch.fingerprint()}); the trial folder belongs to another study or was overwritten"
        )
    model = build_model(arch)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()
