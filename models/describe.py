"""One description of an architecture's layers, for the model card, ``model.py`` and reports."""

from __future__ import annotations

import dataclasses
from typing import Any

from qkvsearch.models.config import ArchConfig, AttentionConfig

#: The columns of :func:`layer_rows`, in order.
COLUMNS = ("layer", "heads", "kv heads", "d_k", "d_v", "scaling", "masks", "cross heads", "ffn", "d_ff")


def _settings(component: Any) -> str:
    """``name`` or ``name(key=value, ...)`` for a component config."""
    fields = {f.name: getattr(component, f.name) for f in dataclasses.fields(component)}
    return component.name + (f"({', '.join(f'{k}={v}' for k, v in fields.items())})" if fields else "")


def masks_text(attention: AttentionConfig) -> str:
    """The layer's masks with their settings (``causal+sliding_window(window=64)``)."""
    return "+".join(_settings(m) for m in attention.masks) or "bidirectional"


def layer_rows(arch: ArchConfig) -> list[dict[str, Any]]:
    """One row per layer (encoder layers first) with the :data:`COLUMNS`."""
    rows = []
    for stack_name, stack in arch.stacks.items():
        for i, layer in enumerate(stack.layers):
            a = layer.attention
            rows.append(dict(zip(COLUMNS, (
                f"{stack_name} {i}", a.n_heads, a.n_kv_heads, a.d_k, a.d_v, _settings(a.scaling), masks_text(a),
                layer.cross_attention.n_heads if layer.cross_attention else "-", layer.ffn.name, layer.ffn.d_ff,
            ), strict=True)))
    return rows
