"""Multi-head attention assembled from injected parts.

The layer owns the head geometry; the projections, scaling, masks and positions are
modules it is given. Self-attention projects queries, keys and values with one matmul
(:class:`SelfProjection`), cross-attention its queries from the target and keys and values
from the source in one more (:class:`CrossProjection`). Two paths compute the same
function: the fused path through ``torch.nn.functional.scaled_dot_product_attention``
(used unless attention weights are wanted) and the reference path (explicit softmax of
scaled scores), which can hand the per-head weights to a sink (see
:func:`models.capture.capture_attention`). Given a :class:`LayerCache`, self-attention
appends the new keys and values to those of the positions before (decoding one token at a
time computes each position's keys once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qkvsearch.models.masks import CombinedMask, MaskContext
from qkvsearch.models.positions import Positions
from qkvsearch.models.scaling import Scaling

WeightsSink = Callable[[torch.Tensor], None]


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """``[batch, seq, n * d]`` as ``[batch, n, seq, d]`` (a view)."""
    return x.unflatten(-1, (n, d)).transpose(1, 2)


class SelfProjection(nn.Module):
    """Queries, keys and values of self-attention from one ``Linear``
    (``d_model -> n_heads * d_k + n_kv_heads * (d_k + d_v)``), split by sizes."""

    def __init__(self, qkv: nn.Linear, *, n_heads: int, n_kv_heads: int, d_k: int, d_v: int) -> None:
        super().__init__()
        self.qkv = qkv
        self.n_heads, self.n_kv_heads, self.d_k, self.d_v = n_heads, n_kv_heads, d_k, d_v
        self.sizes = [n_heads * d_k, n_kv_heads * d_k, n_kv_heads * d_v]

    def forward(self, x: torch.Tensor, source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        return _heads(q, self.n_heads, self.d_k), _heads(k, self.n_kv_heads, self.d_k), _heads(v, self.n_kv_heads, self.d_v)


class CrossProjection(nn.Module):
    """Queries from the target (``q``), keys and values from the source in one ``Linear`` (``kv``)."""

    def __init__(self, q: nn.Linear, kv: nn.Linear, *, n_heads: int, n_kv_heads: int, d_k: int, d_v: int) -> None:
        super().__init__()
        self.q, self.kv = q, kv
        self.n_heads, self.n_kv_heads, self.d_k, self.d_v = n_heads, n_kv_heads, d_k, d_v
        self.sizes = [n_kv_heads * d_k, n_kv_heads * d_v]

    def forward(self, x: torch.Tensor, source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v = self.kv(source).split(self.sizes, dim=-1)
        return _heads(self.q(x), self.n_heads, self.d_k), _heads(k, self.n_kv_heads, self.d_k), _heads(v, self.n_kv_heads, self.d_v)


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before the projections were fused (``q_proj``, ``k_proj`` and ``v_proj``
    per attention layer), renamed and concatenated into today's ``project.qkv`` (self-attention)
    or ``project.q`` and ``project.kv`` (cross-attention); other state passes unchanged."""
    state = dict(state)
    for key in [k for k in state if k.endswith("q_proj.weight")]:
        prefix = key[: -len("q_proj.weight")]
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{prefix}{name}_proj.{kind}", None) for name in "qkv"]
            if any(p is None for p in parts):
                continue
            q, k, v = parts
            if prefix.endswith("cross_attention."):
                state[f"{prefix}project.q.{kind}"] = q
                state[f"{prefix}project.kv.{kind}"] = torch.cat([k, v])
            else:
                state[f"{prefix}project.qkv.{kind}"] = torch.cat([q, k, v])
    return state


class LayerCache:
    """The keys and values one self-attention layer has computed so far, ``[batch, kv_heads, len, d]``
    (rotated and scaled as the scores use them)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Positions held."""
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends the new positions' keys and values; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped key/value heads.

    Args:
        n_heads: query heads.
        n_kv_heads: key/value heads; divides ``n_heads`` (1 is multi-query attention).
        d_k: query/key dim per head.
        d_v: value dim per head.
        project: maps ``(x, source)`` to ``q``, ``k``, ``v`` as ``[batch, heads, len, d]``.
        out_proj: ``n_heads * d_v -> d_model``.
        scaling: maps ``(q, k)`` to ``(q, k, scale)``.
        mask: the intersection of the layer's masks.
        positions: rotates q/k and biases scores (identity where the kind does neither).
        dropout: dropout on the attention weights while training.
    """

    def __init__(
        self,
        *,
        n_heads: int,
        n_kv_heads: int,
        d_k: int,
        d_v: int,
        project: nn.Module,
        out_proj: nn.Module,
        scaling: Scaling,
        mask: CombinedMask,
        positions: Positions,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.d_k, self.d_v = n_heads, n_kv_heads, d_k, d_v
        self.project, self.out_proj = project, out_proj
        self.scaling = scaling
        self.mask = mask
        self.positions = positions
        self.dropout = dropout
        #: "fused" or "reference"; capture forces the reference path.
        self.path = "fused"
        #: Receives ``[batch, heads, q_len, k_len]`` weights when set.
        self.weights_sink: WeightsSink | None = None

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """Attends from ``x`` to ``source`` (``x`` itself for self-attention).

        Args:
            x: ``[batch, q_len, d_model]``.
            source: ``[batch, k_len, d_source]``, or None for self-attention.
            key_padding_mask: ``[batch, k_len]``, True at real tokens (with a cache: over
                the cached and the new positions).
            cache: self-attention only: the earlier positions' keys and values, extended
                by those of ``x``, whose tokens follow them.

        Returns:
            ``[batch, q_len, d_model]``.
        """
        batch, q_len, _ = x.shape
        offset = cache.length if cache is not None else 0
        q, k, v = self.project(x, source)
        # q: [batch, heads, q_len, d_k]; k: [batch, kv_heads, k_len, d_k]; v: [..., d_v]
        q, k = self.positions.rotate(q, k, offset)
        q, k, scale = self.scaling(q, k)
        if cache is not None:
            k, v = cache.extend(k, v)
        ctx = MaskContext(q_len, k.shape[2], x.device, key_padding_mask, offset)
        dropout = self.dropout if self.training else 0.0
        if self.path == "reference" or self.weights_sink is not None:
            bias = self.positions.score_bias(self.n_heads, ctx, q.dtype)
            out = self._reference(q, k, v, scale, self.mask(ctx)[0], bias, dropout)
        else:
            out = self._fused(q, k, v, scale, ctx, dropout)
        out = out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.d_v)
        return self.out_proj(out)  # [batch, q_len, d_model]

    def _fused(self, q, k, v, scale, ctx: MaskContext, dropout: float) -> torch.Tensor:
        """``scaled_dot_product_attention`` with ``is_causal``, a boolean mask, or an additive
        bias with the mask's fixed part folded in (cached by the positions, one per model)."""
        bias = self.positions.score_bias(self.n_heads, ctx, q.dtype, self.mask)
        if bias is None:
            attn_mask, is_causal = self.mask(ctx, allow_is_causal=True)
        else:
            attn_mask, is_causal = bias, False
            padding = self.mask.padding(ctx)
            if padding is not None:
                attn_mask = bias.masked_fill(~padding, float("-inf"))
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )

    def _reference(self, q, k, v, scale, visible, bias, dropout) -> torch.Tensor:
        """Softmax of scaled scores, then the weighted sum of values."""
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # [batch, heads, k_len, d_k]
        v = v.repeat_interleave(group, dim=1)  # [batch, heads, k_len, d_v]
        scores = (q @ k.transpose(-2, -1)) * scale  # [batch, heads, q_len, k_len]
        if bias is not None:
            scores = scores + bias
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        weights = scores.softmax(dim=-1)
        if visible is not None:  # a query that sees no key (all padding) gets zeros, as in the fused path
            weights = weights.masked_fill(~visible, 0.0)
        if self.weights_sink is not None:
            self.weights_sink(weights.detach())
        weights = F.dropout(weights, dropout) if dropout else weights
        return weights @ v  # [batch, heads, q_len, d_v]

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, d_k={self.d_k}, d_v={self.d_v}"
