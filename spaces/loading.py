"""Loading and checking a declarative space: every problem is found before any trial."""

from __future__ import annotations

import graphlib
from collections.abc import Mapping
from typing import Any

import optuna

from qkvsearch.spaces.expressions import Expression, ExpressionError
from qkvsearch.spaces.schema import (
    BUDGET_KEYS,
    MEASURED,
    OPTIM_KEYS,
    PARAM_KEYS,
    SPACE_KEYS,
    TYPES,
    Param,
    SpaceError,
)
from qkvsearch.spaces.space import Space, outside

_RESERVED = {"layer", *MEASURED}
_SCALARS = (type(None), bool, int, float, str)


def load_space_dict(data: Any, source: str = "space") -> Space:
    """Checks ``data`` and builds the space; raises :class:`SpaceError` naming ``source``."""
    where = _Where(source)
    if not isinstance(data, Mapping):
        raise where.error("", f"a space must be a mapping, got {type(data).__name__}")
    unknown = sorted(map(str, set(data) - SPACE_KEYS))
    if unknown:
        raise where.error(unknown[0], f"unknown key; valid keys: {', '.join(sorted(SPACE_KEYS))}")
    name = data.get("name", source)
    if not isinstance(name, str) or not name:
        raise where.error("name", f"must be a non-empty string, got {name!r}")
    params = _load_params(data.get("params") or {}, where)
    by_name = {p.name: p for p in params}
    derived = _load_derived(data.get("derived") or {}, by_name, where)
    scalars = {n for n, p in by_name.items() if p.per_layer is None} | set(derived)
    constraints = [
        _expression(c, scalars | set(MEASURED), where, f"constraints[{i}]")
        for i, c in enumerate(_list(data.get("constraints") or [], where, "constraints"))
    ]
    budget = _load_budget(data.get("budget") or {}, where)
    if "architecture" not in data or not isinstance(data["architecture"], Mapping):
        raise where.error("architecture", "required: the architecture template as a mapping")
    _check_template(data["architecture"], by_name, scalars, False, where, "architecture")
    optim = _load_optim(data.get("optim") or {}, by_name, scalars, where)
    reference = _load_reference(data.get("reference") or {}, by_name, where)
    description = data.get("description") or ""
    return Space(name, params, derived, constraints, budget, data["architecture"], str(description), optim, reference)


class _Where:
    """Builds errors that name the source and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, message: str) -> SpaceError:
        return SpaceError(f"{self.source}: {key or '<top>'}: {message}")


def _list(value: Any, where: _Where, key: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise where.error(key, f"must be a list, got {value!r}")
    return list(value)


def _expression(source: Any, names: set[str], where: _Where, key: str) -> Expression:
    try:
        expression = Expression(source)
    except ExpressionError as error:
        raise where.error(key, str(error)) from None
    unknown = sorted(expression.names - names)
    if unknown:
        raise where.error(
            key, f"{unknown[0]!r} is not defined before this point; known names: {', '.join(sorted(names)) or 'none'}"
        )
    return expression


def _load_params(data: Any, where: _Where) -> list[Param]:
    if not isinstance(data, Mapping):
        raise where.error("params", f"must be a mapping of name to distribution, got {data!r}")
    params: list[Param] = []
    for name, spec in data.items():
        key = f"params.{name}"
        if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
            raise where.error(key, f"a parameter name must be an identifier other than {sorted(_RESERVED)}")
        if not isinstance(spec, Mapping):
            raise where.error(key, f"must be a mapping with 'type' ({', '.join(TYPES)}), got {spec!r}")
        unknown = sorted(map(str, set(spec) - PARAM_KEYS))
        if unknown:
            raise where.error(f"{key}.{unknown[0]}", f"unknown key; valid keys: {', '.join(sorted(PARAM_KEYS))}")
        earlier = {p.name: p for p in params}
        scalars = {n for n, p in earlier.items() if p.per_layer is None}
        when = _expression(spec["when"], scalars, where, f"{key}.when") if spec.get("when") is not None else None
        per_layer = spec.get("per_layer")
        if per_layer is not None:
            depth = earlier.get(per_layer) if isinstance(per_layer, str) else None
            if depth is None or depth.per_layer or not isinstance(depth.distribution, optuna.distributions.IntDistribution):
                ints = [n for n, p in earlier.items() if isinstance(p.distribution, optuna.distributions.IntDistribution) and not p.per_layer]
                raise where.error(f"{key}.per_layer", f"must name an int parameter declared before it, got {per_layer!r}; candidates: {', '.join(ints) or 'none'}")
        params.append(Param(name, _distribution(spec, where, key), when, per_layer))
    return params


def _distribution(spec: Mapping[str, Any], where: _Where, key: str) -> optuna.distributions.BaseDistribution:
    kind = spec.get("type")
    if kind not in TYPES:
        raise where.error(f"{key}.type", f"unknown distribution {kind!r}; valid: {', '.join(TYPES)}")
    own = {"categorical": {"choices"}}.get(kind, {"low", "high", "step", "log"})
    foreign = sorted(map(str, set(spec) - own - {"type", "when", "per_layer"}))
    if foreign:
        raise where.error(f"{key}.{foreign[0]}", f"not a setting of a {kind} distribution; its settings: {', '.join(sorted(own))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise where.error(f"{key}.choices", f"must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if not isinstance(c, _SCALARS)]
        if bad:
            raise where.error(f"{key}.choices", f"choices must be None, bool, int, float or str, got {bad[0]!r}")
        return optuna.distributions.CategoricalDistribution(list(choices))
    low, high = spec.get("low"), spec.get("high")
    number = int if kind == "int" else (int, float)
    for field, value in (("low", low), ("high", high)):
        if not isinstance(value, number) or isinstance(value, bool):
            raise where.error(f"{key}.{field}", f"must be a{'n int' if kind == 'int' else ' number'}, got {value!r}")
    if low > high:
        raise where.error(f"{key}.low", f"low ({low}) must be <= high ({high})")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise where.error(f"{key}.log", f"must be true or false, got {log!r}")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0):
        raise where.error(f"{key}.step", f"must be a positive number, got {step!r}")
    if log and (low <= 0 or step not in (None, 1)):
        raise where.error(f"{key}.log", "a log range needs low > 0 and no step")
    try:
        if kind == "int":
            return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
        return optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=step)
    except ValueError as error:
        raise where.error(key, str(error)) from None


def _load_derived(data: Any, params: dict[str, Param], where: _Where) -> dict[str, Expression]:
    if not isinstance(data, Mapping):
        raise where.error("derived", f"must be a mapping of name to expression, got {data!r}")
    scalars = {n for n, p in params.items() if p.per_layer is None}
    names = scalars | set(data)
    derived = {}
    for name, source in data.items():
        key = f"derived.{name}"
        if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED or name in params:
            raise where.error(key, "a derived name must be an identifier not used by a parameter or reserved")
        derived[name] = _expression(source, names, where, key)
    graph = {k: [n for n in e.names if n in derived] for k, e in derived.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        raise where.error("derived", f"derived values form a cycle: {' -> '.join(error.args[1])}") from None
    return derived


def _load_budget(data: Any, where: _Where) -> dict[str, float]:
    if not isinstance(data, Mapping):
        raise where.error("budget", f"must be a mapping, got {data!r}")
    budget = {}
    for key, value in data.items():
        if key not in BUDGET_KEYS:
            raise where.error(f"budget.{key}", f"unknown key; valid keys: {', '.join(BUDGET_KEYS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise where.error(f"budget.{key}", f"must be a positive number or null, got {value!r}")
        budget[key] = value
    return budget


def _load_reference(data: Any, params: dict[str, Param], where: _Where) -> dict[str, Any]:
    """The reference configuration: parameter values, each one its distribution can take."""
    if not isinstance(data, Mapping):
        raise where.error("reference", f"must be a mapping of parameter values, got {data!r}")
    for name, value in data.items():
        param = params.get(name)
        if param is None:
            raise where.error(f"reference.{name}", f"not a parameter of this space; parameters: {', '.join(params)}")
        values = value if param.per_layer is not None and isinstance(value, list) else [value]
        bad = [v for v in values if outside(v, param.distribution)]
        if bad:
            raise where.error(f"reference.{name}", f"{bad[0]!r} is not a value of {param.name} ({_shown(param)})")
    return dict(data)


def _shown(param: Param) -> str:
    distribution = param.distribution
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return "choices " + ", ".join(map(repr, distribution.choices))
    return f"[{distribution.low}, {distribution.high}]" + (f" step {distribution.step}" if distribution.step else "")


def _load_optim(data: Any, params: dict[str, Param], names: set[str], where: _Where) -> dict[str, Any]:
    """The ``optim`` template: optimiser settings, each a constant or an ``"=EXPR"`` of scalars."""
    if not isinstance(data, Mapping):
        raise where.error("optim", f"must be a mapping of optimiser settings, got {data!r}")
    for key, value in data.items():
        if key not in OPTIM_KEYS:
            raise where.error(f"optim.{key}", f"unknown key; valid keys: {', '.join(OPTIM_KEYS)}")
        if isinstance(value, str) and value.startswith("="):
            _expression(value[1:], names, where, f"optim.{key}")
            continue
        valid, meaning = OPTIM_KEYS[key]
        if not valid(value):
            raise where.error(f"optim.{key}", f"must be {meaning} or an \"=EXPR\", got {value!r}")
    return dict(data)


def _check_template(node: Any, params: dict[str, Param], names: set[str], in_layers: bool, where: _Where, key: str) -> None:
    """Checks every expression, ``choose`` and ``for_layers`` node of the template."""
    if isinstance(node, str) and node.startswith("="):
        _expression(node[1:], names, where, key)
    elif isinstance(node, Mapping) and "choose" in node:
        _check_choose(node, params, names, in_layers, where, key)
    elif isinstance(node, Mapping) and "for_layers" in node:
        if set(node) != {"for_layers", "each"}:
            raise where.error(key, "a for_layers node has exactly the keys for_layers and each")
        depth = params.get(node["for_layers"]) if isinstance(node["for_layers"], str) else None
        if depth is None or not isinstance(depth.distribution, optuna.distributions.IntDistribution) or depth.per_layer:
            raise where.error(f"{key}.for_layers", f"must name an int parameter, got {node['for_layers']!r}")
        inner = names | {n for n, p in params.items() if p.per_layer == node["for_layers"]} | {"layer"}
        _check_template(node["each"], params, inner, True, where, f"{key}.each")
    elif isinstance(node, Mapping):
        for child_key, child in node.items():
            _check_template(child, params, names, in_layers, where, f"{key}.{child_key}")
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            _check_template(child, params, names, in_layers, where, f"{key}[{i}]")


def _check_choose(node: Mapping[str, Any], params: dict[str, Param], names: set[str], in_layers: bool, where: _Where, key: str) -> None:
    if set(node) != {"choose", "cases"} or not isinstance(node["cases"], Mapping):
        raise where.error(key, "a choose node has exactly the keys choose and cases (a mapping)")
    param = params.get(node["choose"]) if isinstance(node["choose"], str) else None
    if param is None or node["choose"] not in names:
        raise where.error(f"{key}.choose", f"must name a parameter usable here, got {node['choose']!r}")
    choices = getattr(param.distribution, "choices", None)
    if choices is not None:
        missing = [c for c in choices if c not in node["cases"]]
        if missing:
            raise where.error(f"{key}.cases", f"no case for {missing[0]!r}; every choice of {param.name} needs one")
    for case, child in node["cases"].items():
        _check_template(child, params, names, in_layers, where, f"{key}.cases.{case}")
