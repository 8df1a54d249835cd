"""Tensors a model computes from lengths alone (masks, position tables, biases), kept between
forward passes instead of being rebuilt in every layer on every step."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


def cached(cache: dict, key: Hashable, make: Callable[[], torch.Tensor | None], limit: int = 4) -> torch.Tensor | None:
    """``cache[key]``, made by ``make()`` on first use; the oldest of more than ``limit`` keys goes.

    Made outside inference mode, so a tensor first made during an inference-mode validation
    can still be saved for backward by the next training step. A cache is a plain dict
    attribute of the module: not a buffer, so it stays out of the state dict.
    """
    if key not in cache:
        with torch.inference_mode(False):
            value = make()
        while len(cache) >= limit:
            cache.pop(next(iter(cache)))
        cache[key] = value
    return cache[key]
