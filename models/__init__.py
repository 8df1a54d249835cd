"""The configurable Transformer: attention components, blocks, models, analytic counts.

This package depends on torch alone. Its names load on first use (PEP 562), so importing
``qkvsearch.models.errors`` (the error base every layer shares) imports no torch: the
command line answers ``--help`` and refuses bad input before torch is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each public name and the module that defines it.
_WHERE = {
    "MultiHeadAttention": "attention",
    "capture_attention": "capture",
    "set_attention_path": "capture",
    "ArchConfig": "config",
    "AttentionConfig": "config",
    "LayerConfig": "config",
    "StackConfig": "config",
    "count_parameters": "counting",
    "flops_per_token": "counting",
    "FEEDFORWARDS": "feedforward",
    "HEADS": "heads",
    "MASKS": "masks",
    "NORMS": "norms",
    "PLACEMENTS": "norms",
    "POSITIONS": "positions",
    "ConfigError": "registry",
    "Registry": "registry",
    "SCALINGS": "scaling",
    "REGISTRIES": "components",
    "EncoderDecoderModel": "transformer",
    "StackModel": "transformer",
    "build_model": "transformer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
