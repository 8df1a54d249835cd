"""Position information: added to embeddings, rotated into q/k, or biased into scores.

A position module offers three hooks, each an identity by default, so the Transformer
and the attention layer call all three and never ask which kind they hold:
``embed`` (absolute encodings added to token embeddings), ``rotate`` (applied to
queries and keys) and ``score_bias`` (added to the attention scores). ``offset`` is the
position of the first token given (non-zero when decoding with a key/value cache).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from qkvsearch.models.cache import cached
from qkvsearch.models.masks import CombinedMask, MaskContext
from qkvsearch.models.registry import ComponentConfig, Registry


@dataclasses.dataclass(frozen=True)
class PositionsConfig(ComponentConfig):
    """Base of position configs; parsed through :data:`POSITIONS`."""

    @classmethod
    def __parse__(cls, value: Any, path: str, problems: list[str]) -> PositionsConfig | None:
        return POSITIONS.parse(value, path, problems)

    def n_params(self, d_model: int, max_seq_len: int) -> int:
        """Returns the number of parameters the component adds to one stack."""
        return 0

    def attention_problems(self, d_k: int, path: str) -> list[str]:
        """Returns the problems of using this component in an attention layer with ``d_k``."""
        return []

    def source(self, d_model: int, max_seq_len: int) -> str:
        """The Python expression that builds this component in an exported ``model.py``."""
        raise NotImplementedError(f"{type(self).__name__} defines no source(), so it cannot be exported")


POSITIONS: Registry[PositionsConfig] = Registry("positions")


class Positions(nn.Module):
    """No position information; the base of every position component."""

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Adds absolute positions ``offset ..`` to ``x`` of shape ``[batch, seq, d_model]``."""
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates ``q`` and ``k`` of shape ``[batch, heads, seq, d_k]``, both at positions ``offset ..``."""
        return q, k

    def score_bias(
        self, n_heads: int, ctx: MaskContext, dtype: torch.dtype, mask: CombinedMask | None = None
    ) -> torch.Tensor | None:
        """Returns a ``[heads, q_len, k_len]`` bias added to the scores, or None; with ``mask``,
        ``-inf`` where the mask's fixed part hides a key."""
        return None


@dataclasses.dataclass(frozen=True)
class NoPositionsConfig(PositionsConfig):
    """No position information (order comes only from the mask, if any)."""

    def source(self, d_model: int, max_seq_len: int) -> str:
        return "Positions()"


@POSITIONS.register("none", NoPositionsConfig)
def _none(config: NoPositionsConfig, *, d_model: int, max_seq_len: int) -> Positions:
    return Positions()


@dataclasses.dataclass(frozen=True)
class SinusoidalConfig(PositionsConfig):
    """Fixed sinusoids added to the embeddings (Vaswani et al., 2017)."""

    base: float = 10000.0

    def problems(self, path: str) -> list[str]:
        return [] if self.base > 1 else [f"{path}.base: must be > 1, got {self.base}"]

    def source(self, d_model: int, max_seq_len: int) -> str:
        return f"Sinusoidal({d_model}, {self.base!r})"


class Sinusoidal(Positions):
    def __init__(self, d_model: int, base: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.base = base
        self._tables: dict[tuple, torch.Tensor] = {}

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        end = offset + x.shape[1]
        return x + cached(self._tables, (end, x.device, x.dtype), lambda: self._table(end, x.device, x.dtype))[offset:]

    def _table(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        position = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None]
        exponent = torch.arange(0, self.d_model, 2, device=device, dtype=torch.float32)
        angle = position * torch.exp(-math.log(self.base) * exponent / self.d_model)
        table = torch.zeros(seq_len, self.d_model, device=device)
        table[:, 0::2] = torch.sin(angle)
        table[:, 1::2] = torch.cos(angle[:, : self.d_model // 2])
        return table.to(dtype)  # [seq, d_model]


@POSITIONS.register("sinusoidal", SinusoidalConfig)
def _sinusoidal(config: SinusoidalConfig, *, d_model: int, max_seq_len: int) -> Positions:
    return Sinusoidal(d_model, config.base)


@dataclasses.dataclass(frozen=True)
class LearnedConfig(PositionsConfig):
    """A learned embedding per absolute position, up to the model's ``max_seq_len``."""

    def n_params(self, d_model: int, max_seq_len: int) -> int:
        return d_model * max_seq_len

    def source(self, d_model: int, max_seq_len: int) -> str:
        return f"Learned({d_model}, {max_seq_len})"


class Learned(Positions):
    def __init__(self, d_model: int, max_seq_len: int) -> None:
        super().__init__()
        self.table = nn.Embedding(max_seq_len, d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        end = offset + x.shape[1]
        if end > self.table.num_embeddings:
            raise ValueError(
                f"sequence length {end} exceeds max_seq_len ({self.table.num_embeddings}) "
                "of the learned positions"
            )
        return x + self.table.weight[offset:end]


@POSITIONS.register("learned", LearnedConfig)
def _learned(config: LearnedConfig, *, d_model: int, max_seq_len: int) -> Positions:
    return Learned(d_model, max_seq_len)


@dataclasses.dataclass(frozen=True)
class RotaryConfig(PositionsConfig):
    """Rotary position embedding of queries and keys (Su et al., 2021), half-split layout."""

    base: float = 10000.0

    def problems(self, path: str) -> list[str]:
        return [] if self.base > 1 else [f"{path}.base: must be > 1, got {self.base}"]

    def attention_problems(self, d_k: int, path: str) -> list[str]:
        if d_k % 2:
            return [f"{path}.d_k: rotary positions need an even d_k, got {d_k}"]
        return []

    def source(self, d_model: int, max_seq_len: int) -> str:
        return f"Rotary({self.base!r})"


class Rotary(Positions):
    def __init__(self, base: float) -> None:
        super().__init__()
        self.base = base
        self._angles: dict[tuple, torch.Tensor] = {}

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        end, d_k = offset + q.shape[-2], q.shape[-1]
        key = (end, d_k, q.device, q.dtype)
        angles = cached(self._angles, key, lambda: self._cos_sin(end, d_k, q.device, q.dtype))
        cos, sin = angles[:, offset:].unbind(0)
        return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)

    def _cos_sin(self, seq_len: int, d_k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        half = d_k // 2
        inv_freq = self.base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
        angle = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
        return torch.stack((angle.cos(), angle.sin())).to(dtype)  # [2, seq, d_k / 2]


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the pairs ``(x[i], x[i + d/2])`` of ``[batch, heads, seq, d]`` by the angles."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


@POSITIONS.register("rotary", RotaryConfig)
def _rotary(config: RotaryConfig, *, d_model: int, max_seq_len: int) -> Positions:
    return Rotary(config.base)


@dataclasses.dataclass(frozen=True)
class ALiBiConfig(PositionsConfig):
    """Attention with linear biases (Press et al., 2022): ``-slope_h * |i - j|`` per head."""

    def source(self, d_model: int, max_seq_len: int) -> str:
        return "ALiBi()"


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Returns the head slopes of Press et al. (2022): the geometric sequence
    ``2^(-8 h / n)`` for a power of two ``n``, and for other head counts the slopes of the
    next lower power of two followed by every other slope of the power above it."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    lower = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(lower) + powers(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes)


class ALiBi(Positions):
    """One bias per head count, length, device, dtype and fixed mask, shared by every layer
    of the stack (the module is), kept between steps."""

    def __init__(self) -> None:
        super().__init__()
        self._biases: dict[tuple, torch.Tensor] = {}

    def score_bias(
        self, n_heads: int, ctx: MaskContext, dtype: torch.dtype, mask: CombinedMask | None = None
    ) -> torch.Tensor | None:
        key = (n_heads, ctx.q_len, ctx.k_len, ctx.q_offset, ctx.device, dtype, mask.key if mask is not None else None)
        return cached(self._biases, key, lambda: self._bias(n_heads, ctx, dtype, mask), limit=8)

    def _bias(self, n_heads: int, ctx: MaskContext, dtype: torch.dtype, mask: CombinedMask | None) -> torch.Tensor:
        q = torch.arange(ctx.q_offset, ctx.q_offset + ctx.q_len, device=ctx.device)
        distance = (q[:, None] - torch.arange(ctx.k_len, device=ctx.device)[None, :]).abs()
        bias = (-alibi_slopes(n_heads).to(ctx.device)[:, None, None] * distance).to(dtype)  # [heads, q, k]
        visible = mask.fixed_part(ctx) if mask is not None else None
        return bias if visible is None else bias.masked_fill(~visible, float("-inf"))


@POSITIONS.register("alibi", ALiBiConfig)
def _alibi(config: ALiBiConfig, *, d_model: int, max_seq_len: int) -> Positions:
    return ALiBi()
