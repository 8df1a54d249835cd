"""Held-out test scores: a study selects on validation, and reports the test split too."""

from __future__ import annotations

import pathlib
from typing import Any

import optuna
import torch

from qkvsearch.models import ArchConfig
from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.keys import ARCH_HASH, TEST_SCORES
from qkvsearch.search.base.weights import load_trained
from qkvsearch.search.inspect.artifacts import trial_weights
from qkvsearch.search.inspect.finalists import baseline
from qkvsearch.search.inspect.selection import architecture, top_trials
from qkvsearch.search.trial.lit import LitTransformer


def test_loader(task: Any) -> Any | None:
    """The task's test loader, or None when it has no test split."""
    make = getattr(task, "test_dataloader", None)
    if not callable(make):
        return None
    try:
        return make()
    except (QkvError, NotImplementedError):
        return None


def score(arch: ArchConfig, kind: str, weights: pathlib.Path, loader: Any) -> dict[str, float]:
    """Loss (mean over scored targets) and accuracy of saved weights over ``loader``, on the CPU."""
    lit = LitTransformer(arch, kind)
    lit.model.load_state_dict(load_trained(arch, weights).state_dict())
    lit.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for batch in loader:
            loss, batch_correct, batch_n = lit.val_sums(batch)
            loss_sum += float(loss) * batch_n
            correct += int(batch_correct)
            n += batch_n
    if n == 0:
        raise QkvError("the test split scored no target")
    return {"test_loss": loss_sum / n, "test_acc": correct / n}


def record_test_scores(study: optuna.Study, task: Any, run_root: str | pathlib.Path, k: int = 3) -> dict[str, dict]:
    """Scores the study's best trials (the ``k`` best, or the Pareto front) and its baseline on
    the task's test split, once each, into the study's ``test_scores`` attribute; returns it."""
    scores = dict(study.user_attrs.get(TEST_SCORES) or {})
    loader = test_loader(task)
    if loader is None:
        return scores
    added = False
    base = baseline(study)
    for trial in [*top_trials(study, k), *([base.trial] if base else [])]:
        key = str(trial.number)
        if key in scores or ARCH_HASH not in trial.user_attrs:
            continue
        weights = trial_weights(study, trial, run_root)
        if not weights.is_file():
            continue
        scores[key] = score(architecture(study, trial), task.kind, weights, loader)
        added = True
    if added:
        study.set_user_attr(TEST_SCORES, {**(study.user_attrs.get(TEST_SCORES) or {}), **scores})
    return scores
