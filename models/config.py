"""Typed architecture configs: validated at construction, round-trip through plain dicts.

An :class:`ArchConfig` describes a whole model. Its stacks hold one fully resolved
:class:`LayerConfig` per layer, so per-layer heterogeneity (heads, d_k, window, FFN size)
is a first-class part of the architecture. In dict form a stack gives its defaults once
(``attention``, ``ffn``, ``cross_attention``) and ``layers`` lists per-layer overrides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from qkvsearch.models.feedforward import FeedForwardConfig, GELUConfig
from qkvsearch.models.heads import HeadConfig, LMHeadConfig
from qkvsearch.models.masks import MaskConfig, mask_problems
from qkvsearch.models.norms import LayerNormConfig, NormConfig, PlacementConfig, PreNormConfig
from qkvsearch.models.positions import NoPositionsConfig, PositionsConfig
from qkvsearch.models.registry import ConfigError, parse_dataclass, parse_fields
from qkvsearch.models.scaling import ScalingConfig, SqrtDkConfig

Kind = Literal["encoder", "decoder", "encoder_decoder"]


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One multi-head attention layer."""

    n_heads: int = 4  # query heads
    d_k: int | None = None  # query/key dim per head; None: d_model // n_heads
    d_v: int | None = None  # value dim per head; None: d_k
    n_kv_heads: int | None = None  # key/value heads (GQA; 1 is MQA); None: n_heads
    scaling: ScalingConfig = SqrtDkConfig()  # how scores are scaled
    masks: tuple[MaskConfig, ...] = ()  # intersected; empty is bidirectional
    bias: bool = False  # biases in the q/k/v/output projections
    dropout: float = 0.0  # dropout on the attention weights

    def resolved(self, d_model: int) -> AttentionConfig:
        """Returns the config with every None default made explicit."""
        d_k = self.d_k if self.d_k is not None else d_model // max(self.n_heads, 1)
        return dataclasses.replace(
            self,
            d_k=d_k,
            d_v=self.d_v if self.d_v is not None else d_k,
            n_kv_heads=self.n_kv_heads if self.n_kv_heads is not None else self.n_heads,
        )

    def problems(self, d_model: int, path: str) -> list[str]:
        """Returns the problems of this (unresolved) config in a model of width ``d_model``."""
        out = []
        for name in ("n_heads", "d_k", "d_v", "n_kv_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{path}.{name}: must be >= 1, got {value}")
        if self.n_heads >= 1 and self.d_k is None and d_model % self.n_heads:
            out.append(
                f"{path}.n_heads: d_model ({d_model}) must be divisible by n_heads "
                f"({self.n_heads}) when d_k is not given; valid n_heads: "
                + ", ".join(str(h) for h in range(1, d_model + 1) if d_model % h == 0)[:80]
            )
        if self.n_heads >= 1 and self.n_kv_heads and self.n_heads % self.n_kv_heads:
            out.append(
                f"{path}.n_kv_heads: n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                f"({self.n_kv_heads}); valid n_kv_heads: "
                + ", ".join(str(g) for g in range(1, self.n_heads + 1) if self.n_heads % g == 0)
            )
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"{path}.dropout: must be in [0, 1), got {self.dropout}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain data."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["scaling"] = self.scaling.to_dict()
        out["masks"] = [m.to_dict() for m in self.masks]
        return out


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One resolved layer: self-attention, optional cross-attention, feed-forward."""

    attention: AttentionConfig
    ffn: FeedForwardConfig
    cross_attention: AttentionConfig | None = None

    def resolved(self, d_model: int) -> LayerConfig:
        """Returns the layer with every default made explicit."""
        cross = self.cross_attention.resolved(d_model) if self.cross_attention else None
        return LayerConfig(self.attention.resolved(d_model), self.ffn.resolved(d_model), cross)


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """A stack of layers; ``layers`` holds each layer resolved, ``len(layers) == n_layers``."""

    layers: tuple[LayerConfig, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def resolved(self, d_model: int) -> StackConfig:
        """Returns the stack with every layer's defaults made explicit."""
        return StackConfig(tuple(layer.resolved(d_model) for layer in self.layers))

    def to_dict(self) -> dict[str, Any]:
        """Returns the stack as defaults (the first layer) plus per-layer differences."""
        first = _layer_dict(self.layers[0])
        out: dict[str, Any] = {"n_layers": self.n_layers, **first}
        overrides = [_diff(_layer_dict(layer), first) for layer in self.layers]
        if any(overrides):
            out["layers"] = overrides
        return out


def _layer_dict(layer: LayerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"attention": layer.attention.to_dict(), "ffn": layer.ffn.to_dict()}
    if layer.cross_attention is not None:
        out["cross_attention"] = layer.cross_attention.to_dict()
    return out


def _diff(layer: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Returns, per section, the keys of ``layer`` whose values differ from ``base``."""
    out = {}
    for section, values in layer.items():
        changed = {k: v for k, v in values.items() if base.get(section, {}).get(k) != v}
        if section == "ffn" and "name" in changed:
            changed = values  # another kind: give it whole
        if changed:
            out[section] = changed
    return out


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """A whole model. Build one with :meth:`from_dict` (or the constructor, then it is
    validated the same way); :meth:`to_dict` gives it back as plain data."""

    kind: Kind  # encoder | decoder | encoder_decoder
    vocab_size: int  # tokens in the input (and output, for language models)
    max_seq_len: int  # longest sequence; sizes learned positions and FLOP counts
    d_model: int  # residual stream width
    encoder: StackConfig | None = None  # present for encoder and encoder_decoder
    decoder: StackConfig | None = None  # present for decoder and encoder_decoder
    positions: PositionsConfig = NoPositionsConfig()
    norm: NormConfig = LayerNormConfig()
    norm_placement: PlacementConfig = PreNormConfig()
    head: HeadConfig = LMHeadConfig()
    dropout: float = 0.0  # on embeddings and residual branches
    tie_embeddings: bool = False  # share the output head with the (target) token embedding

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        for name, stack in self.stacks.items():  # make every None default explicit
            object.__setattr__(self, name, stack.resolved(self.d_model))

    @property
    def stacks(self) -> dict[str, StackConfig]:
        """Returns the present stacks by name, encoder first."""
        return {n: s for n, s in (("encoder", self.encoder), ("decoder", self.decoder)) if s}

    def problems(self) -> list[str]:
        """Returns every problem of this config (empty when valid)."""
        out = []
        for name in ("vocab_size", "max_seq_len", "d_model"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: must be in [0, 1), got {self.dropout}")
        wanted = {"encoder": ("encoder",), "decoder": ("decoder",)}.get(self.kind, ("encoder", "decoder"))
        for name in ("encoder", "decoder"):
            present = getattr(self, name) is not None
            if present != (name in wanted):
                verb = "needs" if name in wanted else "cannot have"
                out.append(f"{name}: kind {self.kind!r} {verb} a {name} stack")
        if self.kind != "encoder" and not self.head.per_token:
            out.append(f"head.name: {self.head.name!r} gives one output per sequence; kind {self.kind!r} needs a per-token head")
        if self.tie_embeddings and not self.head.tieable:
            out.append(f"tie_embeddings: head {self.head.name!r} cannot be tied to the embedding")
        for name in ("positions", "norm", "norm_placement", "head"):
            out += getattr(self, name).problems(name)
        for name, stack in self.stacks.items():
            if not stack.layers:
                out.append(f"{name}.n_layers: must be >= 1, got 0")
            for i, layer in enumerate(stack.layers):
                out += self._layer_problems(name, layer, f"{name}.layers[{i}]")
        return out

    def _layer_problems(self, stack: str, layer: LayerConfig, path: str) -> list[str]:
        out = []
        cross_wanted = stack == "decoder" and self.kind == "encoder_decoder"
        if (layer.cross_attention is not None) != cross_wanted:
            verb = "needs" if cross_wanted else "cannot have"
            out.append(f"{path}.cross_attention: a {stack} layer of kind {self.kind!r} {verb} cross-attention")
        attentions = [("attention", layer.attention, False), ("cross_attention", layer.cross_attention, True)]
        for field, attention, cross in attentions:
            if attention is None:
                continue
            out += attention.problems(self.d_model, f"{path}.{field}")
            out += attention.scaling.problems(f"{path}.{field}.scaling")
            out += mask_problems(attention.masks, f"{path}.{field}.masks", cross)
            d_k = attention.resolved(self.d_model).d_k
            if not cross and d_k:
                out += self.positions.attention_problems(d_k, f"{path}.{field}")
        for i, mask in enumerate(layer.attention.masks):
            if mask.bidirectional_prefix() >= self.max_seq_len:
                out.append(f"{path}.attention.masks[{i}].prefix_len: {mask.bidirectional_prefix()} must be below "
                           f"max_seq_len ({self.max_seq_len}): a prefix of the whole sequence leaves no next token to "
                           "score but the last")
        if stack == "decoder" and not any(m.autoregressive for m in layer.attention.masks):
            out.append(
                f"{path}.attention.masks: a decoder's self-attention needs a causal or prefix_lm "
                f"mask, got [{', '.join(m.name for m in layer.attention.masks)}]"
            )
        out += layer.ffn.problems(f"{path}.ffn")
        return out

    def unscored_positions(self) -> int:
        """Leading decoder positions that can see their own next token: inside a prefix-LM's
        bidirectional prefix of P tokens, position t < P - 1 attends to token t + 1. A
        next-token loss must skip them (as prefix-LM training does, Raffel et al. 2020)."""
        if self.decoder is None:
            return 0
        prefix = max((m.bidirectional_prefix() for layer in self.decoder.layers for m in layer.attention.masks), default=0)
        return max(0, prefix - 1)

    def fingerprint(self) -> str:
        """Returns a hash that is equal for equal architectures, however they were written.

        It covers every resolved field of every layer, so two configs that build the same
        model (one with per-layer overrides, one without) hash the same.
        """
        data = self.to_dict()
        for name, stack in self.stacks.items():
            data[name] = [_layer_dict(layer) for layer in stack.layers]
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain data that :meth:`from_dict` reads back."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "max_seq_len": self.max_seq_len,
            "d_model": self.d_model,
        }
        for name in ("positions", "norm", "norm_placement", "head"):
            out[name] = getattr(self, name).to_dict()
        out["dropout"] = self.dropout
        out["tie_embeddings"] = self.tie_embeddings
        for name, stack in self.stacks.items():
            out[name] = stack.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchConfig:
        """Parses and validates a config given as plain data (e.g. loaded from YAML).

        Raises:
            ConfigError: every problem found, each naming its field, value and what is valid.
        """
        problems: list[str] = []
        if not isinstance(data, Mapping):
            raise ConfigError([f"architecture: expected a mapping, got {data!r}"])
        stack_names = ("encoder", "decoder")
        top = {k: v for k, v in data.items() if k not in stack_names}
        top.setdefault("kind", None)  # so a missing kind lists the valid ones
        parsed = parse_fields(cls, top, "", problems, skip=stack_names)
        stacks = {}
        for name in ("encoder", "decoder"):
            if data.get(name) is not None:
                stacks[name] = _parse_stack(data[name], name, problems)
        problems = [p.lstrip(".") for p in problems]
        if problems or parsed is None:
            raise ConfigError(problems)
        return cls(**parsed, **stacks)


_STACK_KEYS = ("n_layers", "attention", "ffn", "cross_attention", "layers")


def _parse_stack(data: Any, path: str, problems: list[str]) -> StackConfig | None:
    """Parses a stack's defaults and per-layer overrides into resolved layers."""
    if not isinstance(data, Mapping):
        problems.append(f"{path}: expected a mapping, got {data!r}")
        return None
    for key in sorted(set(data) - set(_STACK_KEYS)):
        problems.append(f"{path}.{key}: unknown key; valid keys: {', '.join(_STACK_KEYS)}")
    n_layers = data.get("n_layers", 1)
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        problems.append(f"{path}.n_layers: must be an int >= 1, got {n_layers!r}")
        return None
    overrides = data.get("layers") or [{}] * n_layers
    if not isinstance(overrides, (list, tuple)) or len(overrides) != n_layers:
        problems.append(
            f"{path}.layers: must list one override mapping per layer ({n_layers}), got {overrides!r}"
        )
        return None
    base = {k: data[k] for k in ("attention", "ffn", "cross_attention") if data.get(k) is not None}
    base.setdefault("attention", {})
    base["ffn"] = {"name": GELUConfig.name, **_as_mapping(base.get("ffn"))}  # gelu unless named
    layers = []
    for i, override in enumerate(overrides):
        layer = _parse_layer(base, override, f"{path}.layers[{i}]", problems)
        layers.append(layer)
    if any(layer is None for layer in layers):
        return None
    return StackConfig(tuple(layers))


def _parse_layer(
    base: dict[str, Any], override: Any, path: str, problems: list[str]
) -> LayerConfig | None:
    """Merges one layer's overrides onto the stack defaults."""
    if not isinstance(override, Mapping):
        problems.append(f"{path}: expected a mapping of overrides, got {override!r}")
        return None
    for key in sorted(set(override) - set(base) - {"attention", "ffn", "cross_attention"}):
        problems.append(f"{path}.{key}: unknown key; valid keys: attention, ffn, cross_attention")
    merged = {}
    for section in set(base) | set(override):
        default, change = _as_mapping(base.get(section)), _as_mapping(override.get(section))
        if section == "ffn" and "name" in change and change["name"] != default.get("name"):
            default = {}
        merged[section] = {**default, **change}
    ffn = FeedForwardConfig.__parse__(merged["ffn"], f"{path}.ffn", problems)
    attention = parse_dataclass(AttentionConfig, merged["attention"], f"{path}.attention", problems)
    cross = None
    if "cross_attention" in merged:
        cross = parse_dataclass(AttentionConfig, merged["cross_attention"], f"{path}.cross_attention", problems)
        if cross is None:
            return None
    if ffn is None or attention is None:
        return None
    return LayerConfig(attention, ffn, cross)


def _as_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return dict(value) if isinstance(value, Mapping) else {}
