"""Multi-head attention assembled from injected parts.

The layer owns the head geometry and the projections; scaling, masks and positions are
modules it is given. Two paths compute the same function: the fused path through
``torch.nn.functional.scaled_dot_product_attention`` (used unless attention weights are
wanted) and the reference path (explicit softmax of scaled scores), which can hand the
per-head weights to a sink (see :func:`models.capture.capture_attention`).
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


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped key/value heads.

    Args:
        n_heads: query heads.
        n_kv_heads: key/value heads; divides ``n_heads`` (1 is multi-query attention).
        d_k: query/key dim per head.
        d_v: value dim per head.
        q_proj: ``d_model -> n_heads * d_k``.
        k_proj: ``d_source -> n_kv_heads * d_k``.
        v_proj: ``d_source -> n_kv_heads * d_v``.
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
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
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
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
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
    ) -> torch.Tensor:
        """Attends from ``x`` to ``source`` (``x`` itself for self-attention).

        Args:
            x: ``[batch, q_len, d_model]``.
            source: ``[batch, k_len, d_source]``, or None for self-attention.
            key_padding_mask: ``[batch, k_len]``, True at real tokens.

        Returns:
            ``[batch, q_len, d_model]``.
        """
        source = x if source is None else source
        batch, q_len, _ = x.shape
        k_len = source.shape[1]
        q = self.q_proj(x).view(batch, q_len, self.n_heads, self.d_k).transpose(1, 2)
        k = self.k_proj(source).view(batch, k_len, self.n_kv_heads, self.d_k).transpose(1, 2)
        v = self.v_proj(source).view(batch, k_len, self.n_kv_heads, self.d_v).transpose(1, 2)
        # q: [batch, heads, q_len, d_k]; k: [batch, kv_heads, k_len, d_k]; v: [..., d_v]
        q, k = self.positions.rotate(q, k)
        q, k, scale = self.scaling(q, k)
        bias = self.positions.score_bias(self.n_heads, q_len, k_len, x.device, q.dtype)
        reference = self.path == "reference" or self.weights_sink is not None
        ctx = MaskContext(q_len, k_len, x.device, key_padding_mask)
        visible, is_causal = self.mask(ctx, allow_is_causal=bias is None and not reference)
        dropout = self.dropout if self.training else 0.0
        if reference:
            out = self._reference(q, k, v, scale, visible, bias, dropout)
        else:
            out = self._fused(q, k, v, scale, visible, is_causal, bias, dropout)
        out = out.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.d_v)
        return self.out_proj(out)  # [batch, q_len, d_model]

    def _fused(self, q, k, v, scale, visible, is_causal, bias, dropout) -> torch.Tensor:
        """``scaled_dot_product_attention`` with a boolean mask or an additive bias."""
        attn_mask = visible
        if bias is not None:
            attn_mask = bias if visible is None else bias.masked_fill(~visible, float("-inf"))
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
