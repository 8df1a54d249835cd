"""Blocks, stacks and the three model shapes, and ``build_model`` that assembles them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qkvsearch.models.attention import CrossProjection, LayerCache, MultiHeadAttention, SelfProjection
from qkvsearch.models.config import ArchConfig, AttentionConfig, LayerConfig, StackConfig
from qkvsearch.models.feedforward import FEEDFORWARDS
from qkvsearch.models.heads import HEADS
from qkvsearch.models.masks import build_masks
from qkvsearch.models.norms import NORMS, PLACEMENTS, Residual
from qkvsearch.models.positions import POSITIONS, Positions
from qkvsearch.models.scaling import SCALINGS


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention, then feed-forward, each in a residual."""

    def __init__(
        self,
        *,
        self_attention: MultiHeadAttention,
        self_residual: Residual,
        feedforward: nn.Module,
        ffn_residual: Residual,
        cross_attention: MultiHeadAttention | None = None,
        cross_residual: Residual | None = None,
    ) -> None:
        super().__init__()
        self.self_attention, self.self_residual = self_attention, self_residual
        self.cross_attention, self.cross_residual = cross_attention, cross_residual
        self.feedforward, self.ffn_residual = feedforward, ffn_residual

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """Maps ``[batch, seq, d_model]`` to the same shape (``cache``: the self-attention's)."""
        x = self.self_residual(x, lambda h: self.self_attention(h, key_padding_mask=padding_mask, cache=cache))
        if self.cross_attention is not None:
            x = self.cross_residual(x, lambda h: self.cross_attention(h, memory, memory_padding_mask))
        return self.ffn_residual(x, self.feedforward)


class Stack(nn.Module):
    """Token embedding, positions, layers and the final norm (if the placement has one)."""

    def __init__(
        self, *, embedding: nn.Embedding, positions: Positions, layers: list[TransformerLayer],
        final_norm: nn.Module, dropout: float,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.positions = positions
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm

    def forward(
        self,
        tokens: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
    ) -> torch.Tensor:
        """Maps ``[batch, seq]`` token ids to ``[batch, seq, d_model]`` hidden states.

        ``cache`` (one :class:`LayerCache` per layer, from :meth:`new_cache`) holds the
        positions before ``tokens``, which are appended to it.
        """
        offset = cache[0].length if cache else 0
        x = self.dropout(self.positions.embed(self.embedding(tokens), offset))
        for i, layer in enumerate(self.layers):
            x = layer(x, padding_mask, memory, memory_padding_mask, cache[i] if cache else None)
        return self.final_norm(x)

    def new_cache(self) -> list[LayerCache]:
        """An empty key/value cache for this stack's layers."""
        return [LayerCache() for _ in self.layers]


class StackModel(nn.Module):
    """An encoder-only or decoder-only model: one stack and a head."""

    def __init__(self, config: ArchConfig, stack: Stack, head: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.stack = stack
        self.head = head

    def forward(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None
    ) -> torch.Tensor:
        """Returns the head's output for ``[batch, seq]`` tokens (padding_mask True at real tokens).

        With ``cache`` (``model.stack.new_cache()``), ``tokens`` continue the positions the
        cache holds: a decoder then computes each position's keys and values once.
        """
        return self.head(self.stack(tokens, padding_mask, cache=cache), padding_mask)


class EncoderDecoderModel(nn.Module):
    """An encoder over the source and a decoder that cross-attends to it."""

    def __init__(self, config: ArchConfig, encoder: Stack, decoder: Stack, head: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_padding_mask: torch.Tensor | None = None,
        tgt_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns ``[batch, tgt_len, vocab]`` logits for ``[batch, src_len]`` and ``[batch, tgt_len]``."""
        memory = self.encoder(src, src_padding_mask)
        hidden = self.decoder(tgt, tgt_padding_mask, memory, src_padding_mask)
        return self.head(hidden, tgt_padding_mask)


def build_attention(config: AttentionConfig, d_model: int, positions: Positions, cross: bool) -> MultiHeadAttention:
    """Builds one attention layer from its resolved config."""
    h, g, d_k, d_v = config.n_heads, config.n_kv_heads, config.d_k, config.d_v
    geometry = {"n_heads": h, "n_kv_heads": g, "d_k": d_k, "d_v": d_v}
    if cross:
        project = CrossProjection(nn.Linear(d_model, h * d_k, bias=config.bias),
                                  nn.Linear(d_model, g * (d_k + d_v), bias=config.bias), **geometry)
    else:
        project = SelfProjection(nn.Linear(d_model, h * d_k + g * (d_k + d_v), bias=config.bias), **geometry)
    return MultiHeadAttention(
        **geometry,
        project=project,
        out_proj=nn.Linear(h * d_v, d_model, bias=config.bias),
        scaling=SCALINGS.build(config.scaling, n_heads=h, d_k=d_k),
        mask=build_masks(config.masks, self_attention=not cross),
        positions=Positions() if cross else positions,
        dropout=config.dropout,
    )


def _build_layer(config: ArchConfig, layer: LayerConfig, positions: Positions) -> TransformerLayer:
    d = config.d_model

    def residual() -> Residual:
        norm = NORMS.build(config.norm, d_model=d)
        return PLACEMENTS.build(config.norm_placement, norm=norm, dropout=config.dropout)

    cross = {}
    if layer.cross_attention is not None:
        cross = {
            "cross_attention": build_attention(layer.cross_attention, d, positions, cross=True),
            "cross_residual": residual(),
        }
    return TransformerLayer(
        self_attention=build_attention(layer.attention, d, positions, cross=False),
        self_residual=residual(),
        feedforward=FEEDFORWARDS.build(layer.ffn, d_model=d),
        ffn_residual=residual(),
        **cross,
    )


def _build_stack(config: ArchConfig, stack: StackConfig) -> Stack:
    positions = POSITIONS.build(config.positions, d_model=config.d_model, max_seq_len=config.max_seq_len)
    embedding = nn.Embedding(config.vocab_size, config.d_model)
    nn.init.normal_(embedding.weight, std=0.02)
    final = config.norm_placement.final_norm
    return Stack(
        embedding=embedding,
        positions=positions,
        layers=[_build_layer(config, layer, positions) for layer in stack.layers],
        final_norm=NORMS.build(config.norm, d_model=config.d_model) if final else nn.Identity(),
        dropout=config.dropout,
    )


def build_model(config: ArchConfig | Mapping[str, Any]) -> nn.Module:
    """Builds the model an architecture config describes.

    Args:
        config: an :class:`ArchConfig`, or plain data that :meth:`ArchConfig.from_dict` reads.

    Returns:
        A :class:`StackModel` (encoder or decoder) or an :class:`EncoderDecoderModel`.

    Raises:
        ConfigError: the config is invalid; nothing has been built.
    """
    if not isinstance(config, ArchConfig):
        config = ArchConfig.from_dict(config)
    head = HEADS.build(config.head, d_model=config.d_model, vocab_size=config.vocab_size)
    stacks = {name: _build_stack(config, stack) for name, stack in config.stacks.items()}
    if config.tie_embeddings:
        head.proj.weight = stacks["decoder" if config.decoder else "encoder"].embedding.weight
    if config.kind == "encoder_decoder":
        return EncoderDecoderModel(config, stacks["encoder"], stacks["decoder"], head)
    (stack,) = stacks.values()
    return StackModel(config, stack, head)
