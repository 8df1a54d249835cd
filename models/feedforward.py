"""Position-wise feed-forward networks."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkvsearch.models.registry import ComponentConfig, Registry


@dataclasses.dataclass(frozen=True)
class FeedForwardConfig(ComponentConfig):
    """Base of feed-forward configs; parsed through :data:`FEEDFORWARDS`.

    ``d_ff`` is the hidden size; 0 means the conventional default for the kind
    (``4 * d_model``, or ``8/3 * d_model`` rounded up to a multiple of 8 for gated kinds).
    """

    d_ff: int = 0
    bias: bool = True

    @classmethod
    def __parse__(cls, value: Any, path: str, problems: list[str]) -> FeedForwardConfig | None:
        return FEEDFORWARDS.parse(value, path, problems)

    def problems(self, path: str) -> list[str]:
        return [] if self.d_ff >= 0 else [f"{path}.d_ff: must be > 0 (or 0 for the default), got {self.d_ff}"]

    def resolved(self, d_model: int) -> FeedForwardConfig:
        """Returns the config with ``d_ff`` made explicit."""
        return self if self.d_ff else dataclasses.replace(self, d_ff=4 * d_model)

    def n_params(self, d_model: int) -> int:
        """Returns the parameter count of the network (``d_ff`` must be resolved)."""
        return 2 * d_model * self.d_ff + (self.d_ff + d_model) * self.bias

    def matmul_params(self, d_model: int) -> int:
        """Returns the weights used in matrix multiplies (two FLOPs each per token)."""
        return 2 * d_model * self.d_ff

    def source(self, d_model: int) -> str:
        """The Python expression that builds this component in an exported ``model.py``."""
        raise NotImplementedError(f"{type(self).__name__} defines no source(), so it cannot be exported")


FEEDFORWARDS: Registry[FeedForwardConfig] = Registry("feed-forward")


class MLP(nn.Module):
    """``down(activation(up(x)))``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool, activation: nn.Module) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = activation
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))  # [batch, seq, d_ff] inside


class SquaredReLU(nn.Module):
    """``relu(x) ** 2`` (So et al., 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


@dataclasses.dataclass(frozen=True)
class GELUConfig(FeedForwardConfig):
    """Two-layer MLP with GELU."""

    def source(self, d_model: int) -> str:
        return f"MLP({d_model}, {self.d_ff}, {self.bias}, nn.GELU())"


@dataclasses.dataclass(frozen=True)
class ReLUConfig(FeedForwardConfig):
    """Two-layer MLP with ReLU."""

    def source(self, d_model: int) -> str:
        return f"MLP({d_model}, {self.d_ff}, {self.bias}, nn.ReLU())"


@dataclasses.dataclass(frozen=True)
class SquaredReLUConfig(FeedForwardConfig):
    """Two-layer MLP with squared ReLU."""

    def source(self, d_model: int) -> str:
        return f"MLP({d_model}, {self.d_ff}, {self.bias}, SquaredReLU())"


@FEEDFORWARDS.register("gelu", GELUConfig)
def _gelu(config: GELUConfig, *, d_model: int) -> nn.Module:
    return MLP(d_model, config.d_ff, config.bias, nn.GELU())


@FEEDFORWARDS.register("relu", ReLUConfig)
def _relu(config: ReLUConfig, *, d_model: int) -> nn.Module:
    return MLP(d_model, config.d_ff, config.bias, nn.ReLU())


@FEEDFORWARDS.register("squared_relu", SquaredReLUConfig)
def _squared_relu(config: SquaredReLUConfig, *, d_model: int) -> nn.Module:
    return MLP(d_model, config.d_ff, config.bias, SquaredReLU())


@dataclasses.dataclass(frozen=True)
class SwiGLUConfig(FeedForwardConfig):
    """Gated MLP ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020); no biases by default."""

    bias: bool = False

    def resolved(self, d_model: int) -> FeedForwardConfig:
        if self.d_ff:
            return self
        return dataclasses.replace(self, d_ff=-(-8 * d_model // 3 // 8) * 8)

    def n_params(self, d_model: int) -> int:
        return 3 * d_model * self.d_ff + (2 * self.d_ff + d_model) * self.bias

    def matmul_params(self, d_model: int) -> int:
        return 3 * d_model * self.d_ff

    def source(self, d_model: int) -> str:
        return f"SwiGLU({d_model}, {self.d_ff}, {self.bias})"


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@FEEDFORWARDS.register("swiglu", SwiGLUConfig)
def _swiglu(config: SwiGLUConfig, *, d_model: int) -> nn.Module:
    return SwiGLU(d_model, config.d_ff, config.bias)
