"""``qkv export``: a study's chosen trial as a folder that runs without qkvsearch.

The command chooses the trial (a number or a rule), loads its weights (or trains it
longer first), gathers what its card tells, and hands the job to the formats in
``search/export/``: the standalone folder (``model.py``, safetensors, card), and with
``onnx=true`` / ``torch_export=true`` a checked ``model.onnx`` / ``model.pt2``.
"""

from __future__ import annotations

import datetime
import pathlib

import optuna
from omegaconf import DictConfig

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.configs import compose_config
from qkvsearch.search.base.keys import CODE_VERSION, DUPLICATE_OF, EXPORTS, SPACE, TASK, TEST_SCORES
from qkvsearch.search.base.settings import check_study_name
from qkvsearch.search.base.weights import load_trained
from qkvsearch.search.export import ExportJob, Format, MainFormat, Provenance, portable, write_folder
from qkvsearch.search.export.onnx import Onnx
from qkvsearch.search.export.program import TorchExport
from qkvsearch.search.export.standalone import Standalone
from qkvsearch.search.export.text import text_side
from qkvsearch.search.inspect.artifacts import trial_weights
from qkvsearch.search.inspect.choose import select_trial
from qkvsearch.search.inspect.finalists import finalists, margin
from qkvsearch.search.inspect.selection import architecture, objective_names
from qkvsearch.search.study.prepare import task_of_study
from qkvsearch.search.study.storage import load_named_study

#: the formats a folder may add besides its main one, by the setting that asks for them
EXTRAS: dict[str, Format] = {"onnx": Onnx(), "torch_export": TorchExport()}


def provenance(study: optuna.Study, trial: optuna.trial.FrozenTrial, weights: str) -> Provenance:
    """What the card says of where the trial came from."""
    attrs = study.user_attrs
    spread = next(((f.mean, f.std, len(f.values)) for f in finalists(study) if f.trial.number == trial.number), None)
    ahead = margin(study)
    value = spread[0] if spread else trial.values[0]
    versus = {"value": ahead["value"], "margin": value - ahead["value"]} if ahead else None
    return Provenance(
        study=study.study_name, trial=trial.number, objectives=objective_names(study), values=list(trial.values),
        task=attrs.get(TASK, "unknown"), space=attrs.get(SPACE, "unknown"), code_version=attrs.get(CODE_VERSION, "unknown"),
        weights=weights, test=(attrs.get(TEST_SCORES) or {}).get(str(trial.number), {}), finalist=spread,
        duplicate_of=trial.user_attrs.get(DUPLICATE_OF), n_trials=len(study.get_trials(deepcopy=False)), baseline=versus,
    )


def retrain(cfg: DictConfig, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> pathlib.Path:
    """Trains the chosen architecture longer with ``qkv train``; returns its weights."""
    from qkvsearch.search.commands.train import train

    # qkv train rebuilds the task from the config the study recorded
    overrides = [f"study_name={study.study_name}", f"trial={trial.number}", f"run_root={cfg.run_root}",
                 *cfg.retrain_overrides]
    train_cfg = compose_config("train", overrides)
    train_cfg.storage = cfg.storage
    return train(train_cfg) / "model.safetensors"


def export(cfg: DictConfig, study: optuna.Study | None = None) -> pathlib.Path:
    """Writes and checks the export folder; returns its path. ``study``: the one
    ``cfg.study_name`` names, when the caller has loaded it already."""
    main = main_format(cfg)
    study = study if study is not None else load_named_study(cfg.storage, cfg.study_name)
    trial = select_trial(study, cfg.trial, cfg.rule, cfg.within, cfg.max_params)
    arch = architecture(study, trial)
    if not cfg.out:
        check_study_name(study.study_name)  # the default folder is named after it: keep it inside exports/
    out = pathlib.Path(cfg.out or pathlib.Path("exports") / f"{study.study_name}-trial{trial.number}")
    if out.exists() and not cfg.overwrite:
        raise QkvError(f"output folder {out} exists; choose out=... or overwrite=true")
    weights = trial_weights(study, trial, cfg.run_root)
    if cfg.retrain:
        weights = retrain(cfg, study, trial)
    elif not weights.is_file():
        raise QkvError(f"trial {trial.number} has no saved weights at {weights}; use retrain=true to train it again")
    model = load_trained(arch, weights)
    job = ExportJob(arch, model, provenance(study, trial, portable(weights, cfg.run_root)))
    try:
        job.text, why_not = text_side(arch, model, task_of_study(study))
    except (QkvError, OSError) as error:
        why_not = f"no text functions: the study's task could not be rebuilt here ({error})"
    job.notes += [why_not] if why_not else []
    extras = [format_ for name, format_ in EXTRAS.items() if cfg[name]]
    folder = write_folder(job, out, main, extras)
    if getattr(main, "path", ""):  # which path a Hugging Face folder took, and why
        print(f"{main.name}: {main.path}")
    record = {"trial": trial.number, "format": main.name, "folder": str(folder.resolve()),
              "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    study.set_user_attr(EXPORTS, [*(study.user_attrs.get(EXPORTS) or []), record])  # the report links it
    return folder


def main_format(cfg: DictConfig) -> MainFormat:
    """The folder's own format, checked before anything is read or written.

    Raises:
        QkvError: an unknown format, or settings of the format that are not valid.
    """
    if cfg.format == "standalone":
        return Standalone()
    if cfg.format == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise QkvError("format=hf needs transformers: pip install 'qkvsearch[hf]'") from None
        from qkvsearch.search.export.hf import HuggingFace

        return HuggingFace(cfg.hf.family)
    raise QkvError(f"format: unknown {cfg.format!r}; valid: standalone, hf")
