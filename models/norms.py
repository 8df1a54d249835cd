"""Normalisation layers and where they sit around a residual branch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from qkvsearch.models.registry import ComponentConfig, Registry


@dataclasses.dataclass(frozen=True)
class NormConfig(ComponentConfig):
    """Base of norm configs; parsed through :data:`NORMS`."""

    eps: float = 1e-5

    @classmethod
    def __parse__(cls, value: Any, path: str, problems: list[str]) -> NormConfig | None:
        return NORMS.parse(value, path, problems)

    def problems(self, path: str) -> list[str]:
        return [] if self.eps > 0 else [f"{path}.eps: must be > 0, got {self.eps}"]

    def n_params(self, d_model: int) -> int:
        """Returns the parameter count of one norm over ``d_model`` features."""
        raise NotImplementedError

    def source(self, d_model: int) -> str:
        """The Python expression that builds this component in an exported ``model.py``."""
        raise NotImplementedError(f"{type(self).__name__} defines no source(), so it cannot be exported")


NORMS: Registry[NormConfig] = Registry("norm")


@dataclasses.dataclass(frozen=True)
class LayerNormConfig(NormConfig):
    """LayerNorm with gain and bias (Ba et al., 2016)."""

    def n_params(self, d_model: int) -> int:
        return 2 * d_model

    def source(self, d_model: int) -> str:
        return f"nn.LayerNorm({d_model}, eps={self.eps!r})"


@dataclasses.dataclass(frozen=True)
class RMSNormConfig(NormConfig):
    """RMSNorm with a gain (Zhang and Sennrich, 2019)."""

    def n_params(self, d_model: int) -> int:
        return d_model

    def source(self, d_model: int) -> str:
        return f"nn.RMSNorm({d_model}, eps={self.eps!r})"


@NORMS.register("layernorm", LayerNormConfig)
def _layernorm(config: LayerNormConfig, *, d_model: int) -> nn.Module:
    return nn.LayerNorm(d_model, eps=config.eps)


@NORMS.register("rmsnorm", RMSNormConfig)
def _rmsnorm(config: RMSNormConfig, *, d_model: int) -> nn.Module:
    return nn.RMSNorm(d_model, eps=config.eps)


@dataclasses.dataclass(frozen=True)
class PlacementConfig(ComponentConfig):
    """Base of norm placements; parsed through :data:`PLACEMENTS`."""

    #: True when the stack needs a norm after its last layer.
    final_norm: ClassVar[bool] = False

    @classmethod
    def __parse__(cls, value: Any, path: str, problems: list[str]) -> PlacementConfig | None:
        return PLACEMENTS.parse(value, path, problems)

    def source(self, norm: str, dropout: float) -> str:
        """The Python expression that builds this component in an exported ``model.py``."""
        raise NotImplementedError(f"{type(self).__name__} defines no source(), so it cannot be exported")


PLACEMENTS: Registry[PlacementConfig] = Registry("norm placement")

Sublayer = Callable[[torch.Tensor], torch.Tensor]


class Residual(nn.Module):
    """A residual connection around a sublayer, with its norm and dropout."""

    def __init__(self, norm: nn.Module, dropout: float) -> None:
        super().__init__()
        self.norm = norm
        self.dropout = nn.Dropout(dropout)


class PreNormResidual(Residual):
    """``x + f(norm(x))`` (Xiong et al., 2020)."""

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        return x + self.dropout(sublayer(self.norm(x)))


class PostNormResidual(Residual):
    """``norm(x + f(x))``, as in the original Transformer."""

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        return self.norm(x + self.dropout(sublayer(x)))


@dataclasses.dataclass(frozen=True)
class PreNormConfig(PlacementConfig):
    """Norm before each sublayer, plus one final norm after the stack."""

    final_norm: ClassVar[bool] = True

    def source(self, norm: str, dropout: float) -> str:
        return f"PreNormResidual({norm}, {dropout!r})"


@dataclasses.dataclass(frozen=True)
class PostNormConfig(PlacementConfig):
    """Norm after each residual addition."""

    def source(self, norm: str, dropout: float) -> str:
        return f"PostNormResidual({norm}, {dropout!r})"


@PLACEMENTS.register("pre", PreNormConfig)
def _pre(config: PreNormConfig, *, norm: nn.Module, dropout: float) -> Residual:
    return PreNormResidual(norm, dropout)


@PLACEMENTS.register("post", PostNormConfig)
def _post(config: PostNormConfig, *, norm: nn.Module, dropout: float) -> Residual:
    return PostNormResidual(norm, dropout)
