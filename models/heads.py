"""Output heads: what the last hidden states become."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from qkvsearch.models.registry import ComponentConfig, Registry


@dataclasses.dataclass(frozen=True)
class HeadConfig(ComponentConfig):
    """Base of head configs; parsed through :data:`HEADS`."""

    #: True when the head gives one output per position (a decoder needs that).
    per_token: ClassVar[bool] = True
    #: True when the head's weight can be tied to the token embedding.
    tieable: ClassVar[bool] = False

    @classmethod
    def __parse__(cls, value: Any, path: str, problems: list[str]) -> HeadConfig | None:
        return HEADS.parse(value, path, problems)

    def n_outputs(self, vocab_size: int) -> int:
        """Returns the size of the head's output."""
        raise NotImplementedError

    def n_params(self, d_model: int, vocab_size: int, tied: bool) -> int:
        """Returns the head's parameter count."""
        raise NotImplementedError

    def source(self, d_model: int, vocab_size: int) -> str:
        """The Python expression that builds this component in an exported ``model.py``."""
        raise NotImplementedError(f"{type(self).__name__} defines no source(), so it cannot be exported")


HEADS: Registry[HeadConfig] = Registry("head")


@dataclasses.dataclass(frozen=True)
class LMHeadConfig(HeadConfig):
    """Next-token (or per-token) logits over the vocabulary, without bias."""

    tieable: ClassVar[bool] = True

    def n_outputs(self, vocab_size: int) -> int:
        return vocab_size

    def n_params(self, d_model: int, vocab_size: int, tied: bool) -> int:
        return 0 if tied else d_model * vocab_size

    def source(self, d_model: int, vocab_size: int) -> str:
        return f"TokenHead(nn.Linear({d_model}, {vocab_size}, bias=False))"


@HEADS.register("lm", LMHeadConfig)
def _lm(config: LMHeadConfig, *, d_model: int, vocab_size: int) -> nn.Module:
    return TokenHead(nn.Linear(d_model, vocab_size, bias=False))


@dataclasses.dataclass(frozen=True)
class ClassesHeadConfig(HeadConfig):
    """Base of heads that give logits over ``n_classes`` through one linear layer with bias."""

    n_classes: int = 2

    def problems(self, path: str) -> list[str]:
        return [] if self.n_classes >= 2 else [f"{path}.n_classes: must be >= 2, got {self.n_classes}"]

    def n_outputs(self, vocab_size: int) -> int:
        return self.n_classes

    def n_params(self, d_model: int, vocab_size: int, tied: bool) -> int:
        return (d_model + 1) * self.n_classes


@dataclasses.dataclass(frozen=True)
class TokenClassifierConfig(ClassesHeadConfig):
    """Logits over ``n_classes`` at every position (tagging)."""

    def source(self, d_model: int, vocab_size: int) -> str:
        return f"TokenHead(nn.Linear({d_model}, {self.n_classes}))"


@HEADS.register("token_classifier", TokenClassifierConfig)
def _token_classifier(config: TokenClassifierConfig, *, d_model: int, vocab_size: int) -> nn.Module:
    return TokenHead(nn.Linear(d_model, config.n_classes))


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(ClassesHeadConfig):
    """One label per sequence: pool the hidden states, then a linear layer."""

    pooling: Literal["mean", "first", "last"] = "mean"
    per_token: ClassVar[bool] = False

    def source(self, d_model: int, vocab_size: int) -> str:
        return f"PooledHead(nn.Linear({d_model}, {self.n_classes}), {self.pooling!r})"


class TokenHead(nn.Module):
    """Applies a linear layer at every position."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.proj(hidden)  # [batch, seq, outputs]


class PooledHead(nn.Module):
    """Pools ``[batch, seq, d_model]`` over real tokens, then projects to classes."""

    def __init__(self, proj: nn.Linear, pooling: str) -> None:
        super().__init__()
        self.proj = proj
        self.pooling = pooling

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if padding_mask is None:
            padding_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        weights = padding_mask.to(hidden.dtype)  # [batch, seq]
        if self.pooling == "first":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            last = padding_mask.long().sum(1).clamp(min=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.proj(pooled)  # [batch, n_classes]


@HEADS.register("classifier", ClassifierConfig)
def _classifier(config: ClassifierConfig, *, d_model: int, vocab_size: int) -> nn.Module:
    return PooledHead(nn.Linear(d_model, config.n_classes), config.pooling)
