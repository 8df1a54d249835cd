"""Search spaces declared as data: parameters, derived values, constraints, budgets and
an architecture template, turned into an :class:`~models.ArchConfig` per Optuna trial.

A space is a mapping (one YAML file under ``conf/space/``)::

    name: tiny
    params:                       # sampled in this order; keys are Optuna parameter names
      n_layers: {type: int, low: 1, high: 3}
      heads: {type: categorical, choices: [1, 2, 4]}
      mask: {type: categorical, choices: [causal, window]}
      window: {type: int, low: 4, high: 32, log: true, when: "mask == 'window'"}
      layer_ffn_mult: {type: categorical, choices: [2, 4], per_layer: n_layers}
    derived:                      # evaluated after sampling, in dependency order
      d_model: heads * 16
    constraints: ["d_model <= 256"]   # may also read n_params and flops_per_token
    budget: {max_params: 500000, max_flops_per_token: 5.0e6}
    optim: {lr: "=lr"}            # optimiser settings searched with the architecture
    architecture:                 # an ArchConfig as plain data, where
      d_model: "=d_model"         #   a string "=EXPR" is an expression's value,
      decoder:
        n_layers: "=n_layers"
        attention:
          masks: {choose: mask, cases: {causal: [causal], window: [causal, {name: sliding_window, window: "=window"}]}}
        layers: {for_layers: n_layers, each: {ffn: {d_ff: "=layer_ffn_mult * d_model"}}}

Inside ``for_layers`` a per-layer parameter reads as that layer's value and ``layer``
as the layer's index. Per-layer parameters are named ``NAME.layerI`` in Optuna and exist
only for ``I < depth``.

``reference`` names the space's standard Transformer, the one a user would train anyway:
a value for each parameter it samples (a per-layer parameter's value holds for every
layer, or is a list). Every study trains it once (``baseline``) and reports the winner's
margin over it.

``optim`` sets what the trial's optimiser takes (``lr``, ``weight_decay``,
``warmup_steps``, ``min_lr_ratio``) over the sweep's ``optim`` settings; the rendered
values are recorded on the trial as its ``optim`` user attribute, so the trial can be
trained again exactly (``qkv train``, finalists) and two trials are the same candidate only
when both their architecture and their ``optim`` agree.
"""

from __future__ import annotations

import graphlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from qkvsearch.models import ArchConfig, ConfigError, count_parameters, flops_per_token
from qkvsearch.spaces.expressions import Expression, ExpressionError
from qkvsearch.spaces.schema import BUDGET_KEYS, MEASURED, OPTIM_KEYS, Infeasible, Param, SpaceError

#: a registry's message for a name it does not hold (models/registry.py)
UNREGISTERED = re.compile(r"\.name: unknown [\w-]+ '[^']*'; available: ")


#: How a space's sampling writes what it found: ``(trial, constraint values, user attributes)``
Recorder = Callable[[optuna.Trial, Mapping[str, float], Mapping[str, Any]], None]


def record_one_by_one(trial: optuna.Trial, constraints: Mapping[str, float], attrs: Mapping[str, Any]) -> None:
    """Records named constraint values (``<= 0`` is feasible) for the samplers, then user
    attributes, each with Optuna's own call (a sweep's trials write them all at once)."""
    for name, value in constraints.items():
        trial.set_constraint(name, value)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)



class Space:
    """A loaded, checked declarative space. Build with :func:`qkvsearch.spaces.loading.load_space_dict`."""

    def __init__(
        self, name: str, params: list[Param], derived: dict[str, Expression],
        constraints: list[Expression], budget: dict[str, float], architecture: Any, description: str = "",
        optim: Mapping[str, Any] | None = None, reference: Mapping[str, Any] | None = None,
    ) -> None:
        self.name, self.description = name, description
        self.optim = dict(optim or {})
        self.reference = dict(reference or {})
        self.params, self.derived, self.constraints = params, derived, constraints
        self.budget, self.architecture = budget, architecture
        self._derived_order = list(graphlib.TopologicalSorter(
            {k: [n for n in e.names if n in derived] for k, e in derived.items()}
        ).static_order())

    @property
    def constraint_names(self) -> list[str]:
        """The constraints recorded on every trial, in order."""
        return [f"constraint{i}" for i in range(len(self.constraints))] + list(BUDGET_KEYS) + ["valid"]

    def optuna_names(self, param: Any) -> list[str]:
        """The Optuna names ``param`` may be sampled under: its own, or one per layer up to
        the most layers its ``per_layer`` parameter allows."""
        if param.per_layer is None:
            return [param.optuna_name()]
        depth = next(p for p in self.params if p.name == param.per_layer).distribution
        return [param.optuna_name(layer) for layer in range(int(depth.high))]

    def reference_params(self) -> dict[str, Any]:
        """The reference configuration as Optuna parameters: a per-layer parameter given once
        holds for every layer of the reference's depth (empty when the space names none)."""
        params: dict[str, Any] = {}
        for param in self.params:
            if param.name not in self.reference:
                continue
            value = self.reference[param.name]
            if param.per_layer is None:
                params[param.optuna_name()] = value
                continue
            depth = int(self.reference.get(param.per_layer, 0))
            values = value if isinstance(value, list) else [value] * depth
            params.update({param.optuna_name(i): v for i, v in enumerate(values[:depth])})
        return params

    def sample_values(self, trial: optuna.Trial) -> dict[str, Any]:
        """Samples every parameter whose condition holds and evaluates derived values."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.when is not None and not param.when.evaluate(values):
                values[param.name] = None
                continue
            if param.per_layer is None:
                values[param.name] = _suggest(trial, param.optuna_name(), param.distribution)
            else:
                depth = values[param.per_layer] or 0
                values[param.name] = [
                    _suggest(trial, param.optuna_name(i), param.distribution) for i in range(depth)
                ]
        for name in self._derived_order:
            values[name] = self.derived[name].evaluate(values)
        return values

    def suggest(self, trial: optuna.Trial, write: Recorder = record_one_by_one) -> ArchConfig:
        """Samples an architecture for ``trial`` and checks it before anything is built.

        Records each constraint as ``trial.set_constraint`` does (``<= 0`` is feasible), so
        Optuna's samplers learn to avoid infeasible regions, with the trial's ``optim`` or
        ``pruned_reason``, through ``write`` (a sweep writes them in one transaction).

        Raises:
            Infeasible: a constraint or budget fails, or the architecture is invalid;
                the reason is in the trial's ``pruned_reason`` user attribute.
        """
        try:
            values = self.sample_values(trial)
            data = render(self.architecture, values)
        except ExpressionError as error:
            raise SpaceError(f"space {self.name}: {error}") from None
        failed, vector = [], [0.0] * len(self.constraint_names)
        try:
            arch = ArchConfig.from_dict(data)
        except ConfigError as error:
            unregistered = [problem for problem in error.problems if UNREGISTERED.search(problem)]
            if unregistered:  # a name no sample can fix: the space (or a missing plugin) is wrong
                raise SpaceError(f"space {self.name}: a choice names a component that is not registered: "
                                 f"{'; '.join(unregistered)} (a component of your own is registered by a module "
                                 "listed in plugins=[...])") from None
            vector[-1] = 1.0
            reasons = ["invalid architecture: " + "; ".join(error.problems)]
            return _reject(trial, dict(zip(self.constraint_names, vector, strict=True)), reasons, write)
        measured = {"n_params": count_parameters(arch), "flops_per_token": flops_per_token(arch)}
        values.update(measured)
        for i, constraint in enumerate(self.constraints):
            if not _check(constraint, values, self.name):
                vector[i] = 1.0
                failed.append(f"constraint {constraint.source!r} is false")
        for j, (key, measure) in enumerate(zip(BUDGET_KEYS, MEASURED, strict=True)):
            limit = self.budget.get(key)
            if limit is not None:
                vector[len(self.constraints) + j] = measured[measure] / limit - 1.0
                if measured[measure] > limit:
                    failed.append(f"{measure} {measured[measure]:,} exceeds {key} {limit:,.0f}")
        if failed:
            return _reject(trial, dict(zip(self.constraint_names, vector, strict=True)), failed, write)
        write(trial, dict(zip(self.constraint_names, vector, strict=True)),
              {"optim": self.render_optim(values)} if self.optim else {})
        return arch

    def render_optim(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The ``optim`` settings for sampled ``values``.

        Raises:
            SpaceError: a setting whose value is not valid (a negative learning rate).
        """
        rendered = render(self.optim, values)
        for key, value in rendered.items():
            valid, meaning = OPTIM_KEYS[key]
            if not valid(value):
                raise SpaceError(f"space {self.name}: optim.{key} = {self.optim[key]!r} gave {value!r}; it must be {meaning}")
        return rendered

    def describe(self) -> list[tuple[str, str, str]]:
        """Returns ``(name, distribution, condition)`` rows for display."""
        rows = []
        for param in self.params:
            condition = param.when.source if param.when else ""
            if param.per_layer:
                condition = (condition + "; " if condition else "") + f"per layer of {param.per_layer}"
            rows.append((param.name, _describe(param.distribution), condition))
        rows += [(name, "= " + expression.source, "derived") for name, expression in self.derived.items()]
        return rows


def _check(constraint: Expression, values: Mapping[str, Any], space: str) -> bool:
    try:
        return bool(constraint.evaluate(values))
    except ExpressionError as error:
        raise SpaceError(f"space {space}: {error}") from None


def _suggest(trial: optuna.Trial, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
    """Calls the public ``suggest_*`` matching ``distribution``."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def record_constraints(trial: optuna.Trial, constraints: Mapping[str, float]) -> None:
    """Records named constraint values (``<= 0`` is feasible) for the samplers."""
    record_one_by_one(trial, constraints, {})


def _reject(trial: optuna.Trial, constraints: Mapping[str, float], reasons: list[str], write: Recorder) -> ArchConfig:
    reason = "infeasible: " + "; ".join(reasons)
    write(trial, constraints, {"pruned_reason": reason})
    raise Infeasible(reason)


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return "choice " + ", ".join(map(str, distribution.choices))
    log = " log" if getattr(distribution, "log", False) else ""
    step = f" step {distribution.step}" if getattr(distribution, "step", None) not in (None, 1) else ""
    kind = "int" if isinstance(distribution, optuna.distributions.IntDistribution) else "float"
    return f"{kind} [{distribution.low}, {distribution.high}]{step}{log}"


def render(template: Any, values: Mapping[str, Any]) -> Any:
    """Fills an architecture template with sampled values (see the module docstring)."""
    if isinstance(template, str) and template.startswith("="):
        return _plain(Expression(template[1:]).evaluate(values))
    if isinstance(template, Mapping):
        if "choose" in template:
            value = values[template["choose"]]
            if value not in template["cases"]:
                raise SpaceError(f"choose {template['choose']}: no case for the value {value!r}")
            return render(template["cases"][value], values)
        if "for_layers" in template:
            return [
                render(template["each"], {**values, **_layer_values(values, i), "layer": i})
                for i in range(values[template["for_layers"]])
            ]
        return {k: render(v, values) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return [render(v, values) for v in template]
    return template


def _layer_values(values: Mapping[str, Any], layer: int) -> dict[str, Any]:
    return {k: v[layer] for k, v in values.items() if isinstance(v, list)}


def _plain(value: Any) -> Any:
    """Integral floats from arithmetic become ints (``d_model / 2`` as a size)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return list(value) if isinstance(value, tuple) else value


def outside(value: Any, distribution: optuna.distributions.BaseDistribution) -> bool:
    """True when ``value`` is not a value ``distribution`` can take."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value not in distribution.choices
    low, high, step = distribution.low, distribution.high, getattr(distribution, "step", None)
    if not isinstance(value, int | float) or not low <= value <= high:
        return True
    return step is not None and abs((value - low) / step - round((value - low) / step)) > 1e-9


class Lacking(Exception):
    """The earlier study's values lack a parameter this space samples (named in ``args[0]``)."""


class ValuesTrial:
    """Just enough of a trial for a space to sample from given values: each ``suggest_*``
    answers from ``params`` and raises :class:`Lacking` for a name it does not hold."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params, self.user_attrs = params, {}

    def _value(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in self.params:
            raise Lacking(name)
        return self.params[name]

    suggest_categorical = suggest_int = suggest_float = _value

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def set_constraint(self, name: str, value: float) -> None:
        pass
