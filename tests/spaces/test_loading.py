"""Malformed spaces fail at load time with errors naming the source, the key and what is valid;
the loader and the expression evaluator survive random and hostile input."""

from __future__ import annotations

import copy

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkvsearch.spaces import Expression, ExpressionError, Infeasible, SpaceError
from qkvsearch.spaces.loading import load_space_dict

GOOD = {
    "name": "t",
    "params": {
        "n_layers": {"type": "int", "low": 1, "high": 3},
        "heads": {"type": "categorical", "choices": [1, 2, 4]},
        "mask": {"type": "categorical", "choices": ["causal", "window"]},
        "window": {"type": "int", "low": 2, "high": 8, "when": "mask == 'window'"},
        "mult": {"type": "categorical", "choices": [1, 2], "per_layer": "n_layers"},
    },
    "derived": {"d_model": "heads * 8", "d_ff": "d_model * 2"},
    "constraints": ["d_model <= 32", "n_params > 0"],
    "budget": {"max_params": 10**6},
    "architecture": {
        "kind": "decoder", "vocab_size": 16, "max_seq_len": 16, "d_model": "=d_model",
        "decoder": {
            "n_layers": "=n_layers",
            "attention": {
                "n_heads": "=heads",
                "masks": {"choose": "mask", "cases": {"causal": ["causal"],
                                                      "window": ["causal", {"name": "sliding_window", "window": "=window"}]}},
            },
            "ffn": {"d_ff": "=d_ff"},
            "layers": {"for_layers": "n_layers", "each": {"ffn": {"d_ff": "=mult * d_model + layer"}}},
        },
    },
}


def _with(path: str, value, delete: bool = False) -> dict:
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return data


def test_the_good_space_samples_per_layer_values_and_derived_sizes():
    space = load_space_dict(GOOD, "good.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        trial = study.ask()
        arch = space.suggest(trial)
        layers = arch.decoder.layers
        assert len(layers) == trial.params["n_layers"]
        d_model = trial.params["heads"] * 8
        for i, layer in enumerate(layers):
            assert layer.ffn.d_ff == trial.params[f"mult.layer{i}"] * d_model + i
        windows = [m.window for m in layers[0].attention.masks if m.name == "sliding_window"]
        assert windows == ([trial.params["window"]] if trial.params["mask"] == "window" else [])
        study.tell(trial, 0.0)


def test_a_failed_constraint_prunes_with_its_reason():
    space = load_space_dict(_with("constraints", ["d_model <= 8"]), "c.yaml")
    study = optuna.create_study()
    study.enqueue_trial({"heads": 2})
    trial = study.ask()
    with pytest.raises(Infeasible, match=r"constraint 'd_model <= 8' is false"):
        space.suggest(trial)
    assert trial.user_attrs["pruned_reason"].startswith("infeasible: constraint")


def test_a_budget_prunes_and_records_how_far_over_it_is():
    space = load_space_dict(_with("budget", {"max_params": 100}), "b.yaml")
    study = optuna.create_study()
    trial = study.ask()
    with pytest.raises(Infeasible, match=r"n_params [\d,]+ exceeds max_params 100"):
        space.suggest(trial)
    constraints = study._storage.get_trial(trial._trial_id).constraints
    assert constraints["max_params"] > 0 and constraints["constraint0"] <= 0


BAD = [
    (_with("params.heads.type", "normal"), r"bad\.yaml: params\.heads\.type: unknown distribution 'normal'; valid: categorical, int, float"),
    (_with("params.n_layers.low", 5), r"params\.n_layers\.low: low \(5\) must be <= high \(3\)"),
    (_with("params.heads.choices", []), r"params\.heads\.choices: must be a non-empty list"),
    (_with("params.heads.choice", [1]), r"params\.heads\.choice: unknown key; valid keys: choices, high, log"),
    (_with("params.window.when", "maks == 'window'"), r"params\.window\.when: 'maks' is not defined before this point"),
    (_with("params.mult.per_layer", "depth"), r"params\.mult\.per_layer: must name an int parameter declared before it"),
    (_with("derived", {"a": "b + 1", "b": "a * 2"}), r"derived: derived values form a cycle"),
    (_with("derived.d_model", "__import__('os').system('true')"), r"derived\.d_model: Call is not allowed"),
    (_with("derived.d_model", "heads.real"), r"Attribute is not allowed"),
    (_with("constraints", ["[x for x in (1,)]"]), r"ListComp is not allowed"),
    (_with("constraints", ["lambda: 1"]), r"Lambda is not allowed"),
    (_with("budget", {"max_param": 5}), r"budget\.max_param: unknown key; valid keys: max_params, max_flops_per_token"),
    (_with("budget", {"max_params": -1}), r"budget\.max_params: must be a positive number or null"),
    (_with("architecture", None, delete=True), r"architecture: required"),
    (_with("architecture.decoder.attention.masks.cases", {"causal": ["causal"]}), r"cases: no case for 'window'"),
    (_with("architecture.decoder.layers.for_layers", "heads"), r"for_layers: must name an int parameter"),
    (_with("architecture.d_model", "=width"), r"architecture\.d_model: 'width' is not defined"),
    (_with("params.heads.log", True), r"params\.heads\.log: not a setting of a categorical distribution; its settings: choices"),
    (_with("params.n_layers.log", "yes"), r"params\.n_layers\.log: must be true or false"),
    (_with("paramz", {}), r"bad\.yaml: paramz: unknown key; valid keys: architecture, budget"),
    (_with("params.layer", {"type": "int", "low": 1, "high": 2}), r"params\.layer: a parameter name must be an identifier other than"),
    (_with("reference", {"depthh": 2}), r"reference\.depthh: not a parameter of this space; parameters: n_layers"),
    (_with("reference", {"heads": 3}), r"reference\.heads: 3 is not a value of heads \(choices 1, 2, 4\)"),
    (_with("optim", {"lrr": 0.1}), r"optim\.lrr: unknown key; valid keys: lr, weight_decay, warmup_steps, min_lr_ratio"),
    (_with("optim", {"lr": -1}), r"optim\.lr: must be a number > 0"),
    (_with("optim", {"lr": "=rate"}), r"optim\.lr: 'rate' is not defined"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=lambda v: v[:30] if isinstance(v, str) else "")
def test_malformed_spaces_fail_at_load_naming_file_key_and_valid_options(data, message):
    with pytest.raises(SpaceError, match=message):
        load_space_dict(data, "bad.yaml")


@pytest.mark.parametrize(
    ("source", "values", "expected"),
    [
        ("d_model % n_heads == 0", {"d_model": 48, "n_heads": 4}, True),
        ("d_model // n_heads", {"d_model": 48, "n_heads": 5}, 9),
        ("2 ** 10 if big else -1", {"big": True}, 1024),
        ("mask in ('a', 'b') and not off", {"mask": "b", "off": False}, True),
        ("1 < x <= 3", {"x": 3}, True),
        ("a or b", {"a": 0, "b": 7}, 7),
    ],
)
def test_expressions_compute_arithmetic_comparisons_and_logic(source, values, expected):
    assert Expression(source).evaluate(values) == expected


@pytest.mark.parametrize(
    ("source", "values", "message"),
    [
        ("x / 0", {"x": 1}, "division by zero"),
        ("2 ** 100000", {}, "exponent 100000 is past the limit"),
        ("'a' * 1000000000", {}, "arithmetic needs numbers"),
        ("missing + 1", {}, "'missing' has no value"),
        ("(10 ** 20) * (10 ** 20)", {}, "out of range"),
    ],
)
def test_expressions_refuse_work_past_their_limits(source, values, message):
    with pytest.raises(ExpressionError, match=message):
        Expression(source).evaluate(values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_random_text_parses_or_raises_expression_error(source):
    try:
        expression = Expression(source)
    except ExpressionError:
        return
    try:
        expression.evaluate({name: 3 for name in expression.names})
    except ExpressionError:
        pass


HOSTILE = st.sampled_from([
    "__import__('os').system('touch /tmp/qkv_pwned')", "open('/etc/passwd').read()", "().__class__.__bases__[0]",
    "x.__dict__", "exec('1')", "globals()", "[1][0]", "{1: 2}", "{1}", "f'{x}'", "(yield)", "x := 1", "await x",
    "lambda: 0", "*x", "9 ** 9 ** 9", "'a' * 10 ** 9", "-(-(-(-(1))))",
])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(HOSTILE, st.text(max_size=20)), min_size=1, max_size=4).map(" ".join))
def test_hostile_expressions_never_run_code(source):
    import pathlib

    try:
        Expression(source).evaluate({"x": 1})
    except ExpressionError:
        pass
    assert not pathlib.Path("/tmp/qkv_pwned").exists()


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(-1, 1e3, allow_nan=False), st.text(max_size=8))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)
param_specs = st.fixed_dictionaries(
    {"type": st.sampled_from(["int", "float", "categorical", "normal"])},
    optional={"low": scalars, "high": scalars, "choices": st.lists(scalars, max_size=3), "log": scalars,
              "step": scalars, "when": st.text(max_size=15), "per_layer": st.text(max_size=5)},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "params": st.dictionaries(st.sampled_from(["a", "b", "c", "layer", "1x"]), param_specs, max_size=3),
            "derived": st.dictionaries(st.sampled_from(["d", "e", "a"]), st.text(max_size=15), max_size=2),
            "constraints": st.lists(st.text(max_size=15), max_size=2),
            "budget": st.dictionaries(st.sampled_from(["max_params", "max_flops_per_token", "x"]), scalars, max_size=2),
            "architecture": trees,
            "name": scalars,
        },
    )
)
def test_the_loader_loads_or_raises_space_error_on_random_spaces(data):
    try:
        space = load_space_dict(data, "fuzz.yaml")
    except SpaceError as error:
        assert str(error).startswith("fuzz.yaml: ")
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    try:
        space.suggest(trial)
    except (Infeasible, SpaceError):
        pass
