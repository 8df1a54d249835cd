"""Every built-in space: 200 random trials, each feasible and buildable or pruned with a reason."""

from __future__ import annotations

import pathlib

import optuna
import pytest
import torch

from qkvsearch.models import build_model, count_parameters, flops_per_token
from qkvsearch.search.study.prepare import build_space, build_task
from qkvsearch.spaces import Infeasible, Space
from tests.conftest import CONF, compose_conf

SPACES = sorted(p.stem for p in (pathlib.Path(CONF) / "space").glob("*.yaml"))
TASK_FOR = {"tiny": "lm_stdlib", "bench": "lm_stdlib", "decoder": "recall", "encoder": "digits", "encoder_decoder": "reverse"}


def _space(name: str):
    cfg = compose_conf("space_show", [f"space={name}", f"task={TASK_FOR[name]}"])
    return build_space(cfg, build_task(cfg))


def test_every_builtin_space_has_a_task_here():
    assert set(SPACES) == set(TASK_FOR)


@pytest.mark.parametrize("name", SPACES)
def test_two_hundred_random_trials_are_valid_or_pruned_with_a_reason(name):
    space = _space(name)
    assert isinstance(space, Space) and space.description
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    feasible = 0
    for _ in range(200):
        trial = study.ask()
        try:
            arch = space.suggest(trial)
        except Infeasible:
            assert trial.user_attrs["pruned_reason"].startswith("infeasible: ")
            assert any(v > 0 for v in study._storage.get_trial(trial._trial_id).constraints.values())
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        feasible += 1
        with torch.device("meta"):
            model = build_model(arch)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(arch)
        for key, limit in space.budget.items():
            measured = count_parameters(arch) if key == "max_params" else flops_per_token(arch)
            assert measured <= limit
        _check_conditions_and_layers(space, trial.params, arch)
        assert all(v <= 0 for v in study._storage.get_trial(trial._trial_id).constraints.values())
        study.tell(trial, 0.0)
    assert feasible >= 100, f"only {feasible} of 200 samples of {name} are feasible"


def _check_conditions_and_layers(space: Space, params: dict, arch) -> None:
    values = {}
    for param in space.params:
        if param.per_layer:
            depth = values[param.per_layer]
            names = sorted(k for k in params if k.startswith(param.name + ".layer"))
            assert names == sorted(param.optuna_name(i) for i in range(depth))
            stack = next(iter(arch.stacks.values()))
            assert stack.n_layers == depth
            continue
        holds = param.when is None or param.when.evaluate(values)
        assert (param.name in params) == bool(holds), param.name
        values[param.name] = params.get(param.name)


def test_equal_architectures_hash_equal_whatever_the_parameter_order():
    space = _space("tiny")
    chosen = {"n_layers": 2, "d_model": 32, "n_heads": 2, "positions": "rotary", "scaling": "sqrt_dk",
              "mask": "sliding_window", "window": 9, "ffn": "gelu", "ffn_mult": 2}
    hashes = []
    for order in (list(chosen), list(reversed(chosen))):
        study = optuna.create_study()
        study.enqueue_trial({k: chosen[k] for k in order})
        hashes.append(space.suggest(study.ask()).fingerprint())
    other = optuna.create_study()
    other.enqueue_trial({**chosen, "window": 10})
    assert hashes[0] == hashes[1]
    assert space.suggest(other.ask()).fingerprint() != hashes[0]


def test_heterogeneous_and_homogeneous_forms_of_one_architecture_hash_equal():
    from qkvsearch.models import ArchConfig

    base = {"kind": "decoder", "vocab_size": 9, "max_seq_len": 8, "d_model": 16}
    uniform = ArchConfig.from_dict({**base, "decoder": {"n_layers": 2, "attention": {"n_heads": 2, "masks": ["causal"]}}})
    spelled = ArchConfig.from_dict({**base, "decoder": {"n_layers": 2, "attention": {"masks": ["causal"]},
                                                        "layers": [{"attention": {"n_heads": 2}}, {"attention": {"n_heads": 2}}]}})
    assert uniform.fingerprint() == spelled.fingerprint()


def test_space_show_reports_feasibility_and_size_ranges():
    from io import StringIO

    from rich.console import Console

    from qkvsearch.search.commands.space import show

    cfg = compose_conf("space_show", ["space=tiny", "n_samples=40"])
    buffer = StringIO()
    stats = show(cfg, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert 0 < stats.feasible <= 40 and len(stats.n_params) == stats.feasible
    assert f"feasible: {stats.feasible} of 40" in text
    assert f"{min(stats.n_params):,} / " in text and "window" in text and "mask == 'sliding_window'" in text
    assert sum(stats.reasons.values()) == 40 - stats.feasible
