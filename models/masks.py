"""Attention masks: which keys each query may attend to.

Masks combine by intersection: a key is visible when every mask in the list allows it.
Each mask returns a boolean tensor broadcastable to ``[batch, 1, q_len, k_len]`` (True
means visible) or None when it restricts nothing. Every built-in mask keeps the diagonal
visible in self-attention, so no row of the combined mask is empty.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from qkvsearch.models.cache import cached
from qkvsearch.models.registry import ComponentConfig, Registry


@dataclasses.dataclass(frozen=True)
class MaskConfig(ComponentConfig):
    """Base of mask configs; parsed through :data:`MASKS`."""

    #: True when the mask alone stops every query from seeing later tokens
    #: (what a language-model decoder needs).
    autoregressive: ClassVar[bool] = False
    #: True when the mask is defined for cross-attention (queries and keys from
    #: different sequences).
    cross_attention_ok: ClassVar[bool] = False
    #: Names of masks this one cannot be combined with, and why.
    conflicts: ClassVar[dict[str, str]] = {}

    @classmethod
    def __parse__(cls, value: Any, path: str, problems: list[str]) -> MaskConfig | None:
        return MASKS.parse(value, path, problems)

    def bidirectional_prefix(self) -> int:
        """Leading positions whose queries may see later keys of the prefix (0: none)."""
        return 0

    def source(self, self_attention: bool) -> str:
        """The Python expression that builds this component in an exported ``model.py``."""
        raise NotImplementedError(f"{type(self).__name__} defines no source(), so it cannot be exported")


MASKS: Registry[MaskConfig] = Registry("mask")


@dataclasses.dataclass
class MaskContext:
    """What masks may read at call time."""

    q_len: int
    k_len: int
    device: torch.device
    #: ``[batch, k_len]``, True at real tokens and False at padding; None when unpadded.
    key_padding_mask: torch.Tensor | None = None
    #: Positions already decoded (held in a :class:`~models.attention.LayerCache`): query
    #: ``i`` sits at position ``q_offset + i``; keys always start at position 0.
    q_offset: int = 0


class Mask(nn.Module):
    """Base of every mask part."""

    #: True when this part is exactly the causal mask (lets the fused path use is_causal).
    causal_only: ClassVar[bool] = False
    #: True when the pattern depends on the lengths alone, not on the batch (so it is cached).
    fixed: ClassVar[bool] = True

    def allowed(self, ctx: MaskContext) -> torch.Tensor | None:
        """Returns the visibility pattern, or None when nothing is masked."""
        raise NotImplementedError


def _offsets(ctx: MaskContext) -> torch.Tensor:
    """Returns ``query_position - key_position`` as a ``[q_len, k_len]`` tensor."""
    q = torch.arange(ctx.q_offset, ctx.q_offset + ctx.q_len, device=ctx.device)[:, None]
    k = torch.arange(ctx.k_len, device=ctx.device)[None, :]
    return q - k


@dataclasses.dataclass(frozen=True)
class NoMaskConfig(MaskConfig):
    """Bidirectional attention: every key is visible (the same as an empty list)."""

    cross_attention_ok: ClassVar[bool] = True

    def source(self, self_attention: bool) -> str:
        return "NoMask()"


class NoMask(Mask):
    def allowed(self, ctx: MaskContext) -> torch.Tensor | None:
        return None


@MASKS.register("none", NoMaskConfig)
def _none(config: NoMaskConfig, *, self_attention: bool) -> Mask:
    return NoMask()


@dataclasses.dataclass(frozen=True)
class CausalConfig(MaskConfig):
    """Each query sees itself and earlier positions only."""

    autoregressive: ClassVar[bool] = True
    conflicts: ClassVar[dict[str, str]] = {
        "prefix_lm": "prefix_lm is already causal after its prefix; with causal the prefix "
        "would lose its bidirectional attention"
    }

    def source(self, self_attention: bool) -> str:
        return "CausalMask()"


class CausalMask(Mask):
    causal_only: ClassVar[bool] = True

    def allowed(self, ctx: MaskContext) -> torch.Tensor | None:
        return _offsets(ctx) >= 0  # [q, k]


@MASKS.register("causal", CausalConfig)
def _causal(config: CausalConfig, *, self_attention: bool) -> Mask:
    return CausalMask()


@dataclasses.dataclass(frozen=True)
class PaddingConfig(MaskConfig):
    """Hides padded keys, read from the padding mask given to the model's forward.

    When the model is called without a padding mask this part masks nothing.
    """

    cross_attention_ok: ClassVar[bool] = True

    def source(self, self_attention: bool) -> str:
        return f"PaddingMask(keep_diagonal={self_attention})"


class PaddingMask(Mask):
    fixed: ClassVar[bool] = False

    def __init__(self, keep_diagonal: bool) -> None:
        super().__init__()
        self.keep_diagonal = keep_diagonal

    def allowed(self, ctx: MaskContext) -> torch.Tensor | None:
        if ctx.key_padding_mask is None:
            return None
        visible = ctx.key_padding_mask[:, None, None, :]  # [batch, 1, 1, k]
        if self.keep_diagonal:
            # A padded query still sees itself, so its row is never empty; real queries
            # never see a padded key, because their own position is not padded.
            visible = visible | (_offsets(ctx) == 0)
        return visible

    def extra_repr(self) -> str:
        return f"keep_diagonal={self.keep_diagonal}"


@MASKS.register("padding", PaddingConfig)
def _padding(config: PaddingConfig, *, self_attention: bool) -> Mask:
    return PaddingMask(keep_diagonal=self_attention)


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig(MaskConfig):
    """Each query sees the keys within ``window`` positions of it (itself included).

    Alone it is symmetric (local attention in an encoder); with ``causal`` it becomes
    the causal window of the last ``window`` positions.
    """

    window: int = 64
    conflicts: ClassVar[dict[str, str]] = {
        "prefix_lm": "a window is undefined inside the bidirectional prefix of prefix_lm"
    }

    def problems(self, path: str) -> list[str]:
        if self.window < 1:
            return [f"{path}.window: must be >= 1, got {self.window}"]
        return []

    def source(self, self_attention: bool) -> str:
        return f"SlidingWindowMask({self.window})"


class SlidingWindowMask(Mask):
    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def allowed(self, ctx: MaskContext) -> torch.Tensor | None:
        return _offsets(ctx).abs() < self.window  # [q, k]

    def extra_repr(self) -> str:
        return f"window={self.window}"


@MASKS.register("sliding_window", SlidingWindowConfig)
def _sliding_window(config: SlidingWindowConfig, *, self_attention: bool) -> Mask:
    return SlidingWindowMask(config.window)


@dataclasses.dataclass(frozen=True)
class PrefixLMConfig(MaskConfig):
    """Prefix-LM (Raffel et al., 2020): the first ``prefix_len`` positions attend to each
    other bidirectionally, every later position attends causally."""

    prefix_len: int = 1
    autoregressive: ClassVar[bool] = True
    conflicts: ClassVar[dict[str, str]] = {
        "causal": CausalConfig.conflicts["prefix_lm"],
        "sliding_window": SlidingWindowConfig.conflicts["prefix_lm"],
    }

    def problems(self, path: str) -> list[str]:
        if self.prefix_len < 0:
            return [f"{path}.prefix_len: must be >= 0, got {self.prefix_len}"]
        return []

    def bidirectional_prefix(self) -> int:
        return self.prefix_len

    def source(self, self_attention: bool) -> str:
        return f"PrefixLMMask({self.prefix_len})"


class PrefixLMMask(Mask):
    def __init__(self, prefix_len: int) -> None:
        super().__init__()
        self.prefix_len = prefix_len

    def allowed(self, ctx: MaskContext) -> torch.Tensor | None:
        key_in_prefix = torch.arange(ctx.k_len, device=ctx.device)[None, :] < self.prefix_len
        return (_offsets(ctx) >= 0) | key_in_prefix  # [q, k]

    def extra_repr(self) -> str:
        return f"prefix_len={self.prefix_len}"


@MASKS.register("prefix_lm", PrefixLMConfig)
def _prefix_lm(config: PrefixLMConfig, *, self_attention: bool) -> Mask:
    return PrefixLMMask(config.prefix_len)


class CombinedMask(nn.Module):
    """The intersection of a layer's mask parts. The parts that depend on the lengths alone
    are computed once per ``(q_len, k_len, device)`` and kept (not in the state dict)."""

    def __init__(self, parts: list[Mask]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.causal = bool(parts) and all(p.causal_only for p in parts)
        #: What the fixed parts are: layers with equal keys have equal fixed patterns.
        self.key = tuple(repr(p) for p in parts if p.fixed)
        self._fixed: dict[tuple, torch.Tensor | None] = {}

    def forward(self, ctx: MaskContext, allow_is_causal: bool = False) -> tuple[torch.Tensor | None, bool]:
        """Returns ``(visible, is_causal)``.

        When ``allow_is_causal`` and the parts amount to the plain causal mask,
        ``is_causal`` is True and ``visible`` None: the fused kernel builds the mask itself.
        """
        if allow_is_causal and self.causal and ctx.q_len == ctx.k_len and not ctx.q_offset:
            return None, True
        visible, padding = self.fixed_part(ctx), self.padding(ctx)
        if padding is not None:
            visible = padding if visible is None else visible & padding
        return visible, False

    def fixed_part(self, ctx: MaskContext) -> torch.Tensor | None:
        """The intersection of the parts that depend on the lengths alone, ``[q_len, k_len]``."""
        key = (ctx.q_len, ctx.k_len, ctx.q_offset, ctx.device)
        return cached(self._fixed, key, lambda: self._intersect(ctx, fixed=True))

    def padding(self, ctx: MaskContext) -> torch.Tensor | None:
        """The intersection of the parts that read the batch (padding), or None."""
        return self._intersect(ctx, fixed=False)

    def _intersect(self, ctx: MaskContext, fixed: bool) -> torch.Tensor | None:
        visible = None
        for part in self.parts:
            allowed = part.allowed(ctx) if part.fixed == fixed else None
            if allowed is not None:
                visible = allowed if visible is None else visible & allowed
        return visible


def build_masks(configs: tuple[MaskConfig, ...], self_attention: bool = True) -> CombinedMask:
    """Builds the combined mask of one attention layer."""
    return CombinedMask([MASKS.build(c, self_attention=self_attention) for c in configs])


def mask_problems(configs: tuple[MaskConfig, ...], path: str, cross: bool) -> list[str]:
    """Returns the problems of a list of masks: duplicates, conflicts, cross-attention use."""
    problems = []
    names = [c.name for c in configs]
    for i, config in enumerate(configs):
        if names.count(config.name) > 1 and names.index(config.name) == i:
            problems.append(f"{path}: mask {config.name!r} is listed more than once")
        for other, why in config.conflicts.items():
            if other in names and names.index(other) > i:
                problems.append(f"{path}: {config.name} cannot combine with {other}: {why}")
        if cross and not config.cross_attention_ok:
            problems.append(
                f"{path}[{i}]: mask {config.name!r} is undefined in cross-attention "
                "(queries and keys come from different sequences); valid there: "
                + ", ".join(n for n in MASKS.names() if MASKS.config_class(n).cross_attention_ok)
            )
    return problems
