"""Capture the attention weights of every layer and head, without touching model code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qkvsearch.models.attention import MultiHeadAttention


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Records attention weights while the context is open.

    Inside the context every :class:`MultiHeadAttention` of ``model`` runs its reference
    path and stores its weights, ``[batch, heads, q_len, k_len]``, under its module name
    (e.g. ``"stack.layers.0.self_attention"``). A module called several times keeps the
    weights of its last call. The model is left as it was when the context closes.

    Example::

        with capture_attention(model) as weights:
            model(tokens)
        weights["stack.layers.0.self_attention"]  # [batch, heads, seq, seq]

    Args:
        model: any module containing attention layers.

    Yields:
        A dict filled as the model runs.
    """
    weights: dict[str, torch.Tensor] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no MultiHeadAttention layer to capture")
    previous = [m.weights_sink for _, m in layers]
    for name, module in layers:
        module.weights_sink = lambda w, name=name: weights.__setitem__(name, w)
    try:
        yield weights
    finally:
        for (_, module), sink in zip(layers, previous, strict=True):
            module.weights_sink = sink


def set_attention_path(model: nn.Module, path: str) -> None:
    """Makes every attention layer of ``model`` run the ``"fused"`` or ``"reference"`` path."""
    if path not in ("fused", "reference"):
        raise ValueError(f"attention path must be 'fused' or 'reference', got {path!r}")
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.path = path
