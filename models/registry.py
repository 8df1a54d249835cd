"""Registries of attention components and the typed parsing of their configs.

Each kind of component (scaling, mask, positions, feed-forward, norm, residual, head) has
one :class:`Registry`. A component is registered with its config dataclass; a config names
the component and gives that dataclass's fields, e.g. ``{"name": "sliding_window",
"window": 64}``. Unknown names and unknown keys are errors that list what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from qkvsearch.models.errors import QkvError

T = TypeVar("T")


class ConfigError(QkvError):
    """A config that cannot work. Holds every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid architecture config:\n  - " + "\n  - ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class ComponentConfig:
    """Base of every component's config. ``name`` is set by :meth:`Registry.register`."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as ``{"name": ..., **fields}``."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def problems(self, path: str) -> list[str]:
        """Returns the problems of this config on its own (field ranges)."""
        return []


C = TypeVar("C", bound=ComponentConfig)


class Registry(Generic[C]):
    """Named components of one kind, each with its config dataclass and a factory."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[type[C], Callable[..., Any]]] = {}

    def register(self, name: str, config_cls: type[C]) -> Callable[[T], T]:
        """Decorator that registers ``factory`` under ``name`` with its config class.

        Args:
            name: the name a config uses to choose this component.
            config_cls: the frozen dataclass holding the component's settings.

        Returns:
            A decorator that returns the factory unchanged.
        """

        def decorate(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            config_cls.name = name
            self._entries[name] = (config_cls, factory)  # type: ignore[assignment]
            return factory

        return decorate

    def names(self) -> list[str]:
        """Returns the registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def config_class(self, name: str) -> type[C]:
        """Returns the config dataclass registered under ``name``."""
        return self._entries[name][0]

    def build(self, config: C, **context: Any) -> Any:
        """Builds the component described by ``config``; ``context`` gives shared sizes."""
        return self._entries[config.name][1](config, **context)

    def parse(self, value: Any, path: str, problems: list[str]) -> C | None:
        """Parses a name or a ``{"name": ..., **fields}`` mapping into a config.

        Problems are appended to ``problems``; returns None when parsing failed.
        """
        if isinstance(value, ComponentConfig):
            value = value.to_dict()
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, typing.Mapping):
            problems.append(
                f"{path}: expected a {self.kind} name or a mapping with 'name', got {value!r}"
            )
            return None
        fields = dict(value)
        name = fields.pop("name", None)
        if name not in self._entries:
            problems.append(
                f"{path}.name: unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            )
            return None
        config = parse_dataclass(self.config_class(name), fields, path, problems)
        if config is not None:
            problems.extend(config.problems(path))
        return config


def parse_dataclass(cls: type[T], data: Any, path: str, problems: list[str]) -> T | None:
    """Builds dataclass ``cls`` from a mapping, checking keys and field types.

    Every problem found is appended to ``problems`` with its dotted path; returns None
    when any field could not be parsed.
    """
    kwargs = parse_fields(cls, data, path, problems)
    return None if kwargs is None else cls(**kwargs)


def parse_fields(cls: type, data: Any, path: str, problems: list[str], skip: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Parses the fields of dataclass ``cls`` (but ``skip``) from a mapping into keyword
    arguments; appends problems and returns None when any field could not be parsed."""
    if not isinstance(data, typing.Mapping):
        problems.append(f"{path}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        problems.append(f"{path}.{key}: unknown key; valid keys: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    ok = not unknown
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                problems.append(f"{path}.{name}: required")
                ok = False
            continue
        parsed, good = _parse_value(hints[name], data[name], f"{path}.{name}", problems)
        ok = ok and good
        kwargs[name] = parsed
    return kwargs if ok else None


def _parse_value(hint: Any, value: Any, path: str, problems: list[str]) -> tuple[Any, bool]:
    """Parses one value against a type hint; returns (value, ok)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, True
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_value(inner, value, path, problems)
    if isinstance(hint, typing.ForwardRef) or hint is Any:
        return value, True
    parser = getattr(hint, "__parse__", None)
    if parser is not None:
        result = parser(value, path, problems)
        return result, result is not None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return None, False
        items = [_parse_value(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(v for v, _ in items), all(ok for _, ok in items)
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{path}: {value!r} is not valid; choose one of {', '.join(map(str, args))}")
            return None, False
        return value, True
    if dataclasses.is_dataclass(hint):
        result = parse_dataclass(hint, value, path, problems)
        return result, result is not None
    return _parse_scalar(hint, value, path, problems)


def _parse_scalar(hint: Any, value: Any, path: str, problems: list[str]) -> tuple[Any, bool]:
    """Checks an int, float, bool or str value (ints are accepted where floats are)."""
    if hint is bool:
        good = isinstance(value, bool)
    elif hint is int:
        good = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        good = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if good else value
    elif hint is str:
        good = isinstance(value, str)
    else:
        raise TypeError(f"unsupported config field type {hint!r} at {path}")
    if not good:
        problems.append(f"{path}: expected {hint.__name__}, got {value!r}")
    return value, good
