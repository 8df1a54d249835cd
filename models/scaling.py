"""Score scaling: how query-key dot products are scaled before the softmax.

A scaling module maps ``(q, k)`` to ``(q', k', scale)`` so that the scores are
``scale * q' @ k'^T``. Keeping ``scale`` a Python float lets the fused path pass it to
``scaled_dot_product_attention`` unchanged; learned scales are folded into ``q'``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from qkvsearch.models.registry import ComponentConfig, Registry


@dataclasses.dataclass(frozen=True)
class ScalingConfig(ComponentConfig):
    """Base of scaling configs; parsed through :data:`SCALINGS`."""

    @classmethod
    def __parse__(cls, value: Any, path: str, problems: list[str]) -> ScalingConfig | None:
        return SCALINGS.parse(value, path, problems)

    def n_params(self, n_heads: int, d_k: int) -> int:
        """Returns the number of parameters the component adds to one attention layer."""
        return 0

    def source(self, n_heads: int, d_k: int) -> str:
        """The Python expression that builds this component in an exported ``model.py``."""
        raise NotImplementedError(f"{type(self).__name__} defines no source(), so it cannot be exported")


SCALINGS: Registry[ScalingConfig] = Registry("scaling")


class Scaling(nn.Module):
    """A constant scale; the base of every scaling component."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        return q, k, self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


@dataclasses.dataclass(frozen=True)
class SqrtDkConfig(ScalingConfig):
    """``1 / sqrt(d_k)``, as in Vaswani et al. (2017)."""

    def source(self, n_heads: int, d_k: int) -> str:
        return f"Scaling({1.0 / math.sqrt(d_k)!r})"


@dataclasses.dataclass(frozen=True)
class InvDkConfig(ScalingConfig):
    """``1 / d_k``, the muP attention scaling (Yang et al., 2022)."""

    def source(self, n_heads: int, d_k: int) -> str:
        return f"Scaling({1.0 / d_k!r})"


@dataclasses.dataclass(frozen=True)
class NoScalingConfig(ScalingConfig):
    """Unscaled dot products."""

    def source(self, n_heads: int, d_k: int) -> str:
        return "Scaling(1.0)"


@SCALINGS.register("sqrt_dk", SqrtDkConfig)
def _sqrt_dk(config: SqrtDkConfig, *, n_heads: int, d_k: int) -> Scaling:
    return Scaling(1.0 / math.sqrt(d_k))


@SCALINGS.register("inv_dk", InvDkConfig)
def _inv_dk(config: InvDkConfig, *, n_heads: int, d_k: int) -> Scaling:
    return Scaling(1.0 / d_k)


@SCALINGS.register("none", NoScalingConfig)
def _no_scaling(config: NoScalingConfig, *, n_heads: int, d_k: int) -> Scaling:
    return Scaling(1.0)


@dataclasses.dataclass(frozen=True)
class LearnedTemperatureConfig(ScalingConfig):
    """A learned inverse temperature per head, initialised to ``1 / sqrt(d_k)``."""

    def n_params(self, n_heads: int, d_k: int) -> int:
        return n_heads

    def source(self, n_heads: int, d_k: int) -> str:
        return f"LearnedTemperature({n_heads}, {d_k})"


class LearnedTemperature(Scaling):
    """Scales each head's queries by a learned positive factor (stored as its log)."""

    def __init__(self, n_heads: int, d_k: int) -> None:
        super().__init__(1.0)
        self.log_scale = nn.Parameter(torch.full((n_heads,), -0.5 * math.log(d_k)))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        # q: [batch, heads, seq, d_k]; one factor per head
        return q * self.log_scale.exp().to(q.dtype)[:, None, None], k, 1.0


@SCALINGS.register("learned_temperature", LearnedTemperatureConfig)
def _learned(config: LearnedTemperatureConfig, *, n_heads: int, d_k: int) -> Scaling:
    return LearnedTemperature(n_heads, d_k)


@dataclasses.dataclass(frozen=True)
class QKNormConfig(ScalingConfig):
    """RMS-normalised queries and keys with learned gains, then ``1 / sqrt(d_k)``
    (Henry et al., 2020; Dehghani et al., 2023)."""

    eps: float = 1e-6

    def n_params(self, n_heads: int, d_k: int) -> int:
        return 2 * d_k

    def problems(self, path: str) -> list[str]:
        return [] if self.eps > 0 else [f"{path}.eps: must be > 0, got {self.eps}"]

    def source(self, n_heads: int, d_k: int) -> str:
        return f"QKNorm({d_k}, {self.eps!r})"


class QKNorm(Scaling):
    """Normalises q and k over the head dimension before the dot product."""

    def __init__(self, d_k: int, eps: float) -> None:
        super().__init__(1.0 / math.sqrt(d_k))
        self.q_norm = nn.RMSNorm(d_k, eps=eps)
        self.k_norm = nn.RMSNorm(d_k, eps=eps)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.q_norm(q), self.k_norm(k), self.scale


@SCALINGS.register("qk_norm", QKNormConfig)
def _qk_norm(config: QKNormConfig, *, n_heads: int, d_k: int) -> Scaling:
    return QKNorm(d_k, config.eps)
