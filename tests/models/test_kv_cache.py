"""Decoding with a key/value cache computes what the full forward does."""

from __future__ import annotations

import random

import pytest
import torch

from qkvsearch.models import build_model
from tests.models.helpers import all_combinations, attention_config, random_config


def decode_stepwise(model: torch.nn.Module, tokens: torch.Tensor, first: int) -> torch.Tensor:
    """Logits of ``tokens`` from a prompt of ``first`` tokens, then one token at a time."""
    stack = model.decoder if hasattr(model, "decoder") else model.stack
    cache = stack.new_cache()
    outputs = [model(tokens[:, :first], cache=cache)]
    for i in range(first, tokens.shape[1]):
        outputs.append(model(tokens[:, i : i + 1], cache=cache))
    assert cache[0].length == tokens.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("scaling,masks,positions", [
    c for c in all_combinations() if any(m in ("causal", "prefix_lm") for m in c[1])])
def test_cached_decoding_equals_the_full_forward(scaling, masks, positions):
    torch.manual_seed(0)
    arch = attention_config(masks=masks, scaling=scaling, positions=positions, kind="decoder", n_heads=4, n_kv_heads=2)
    model = build_model(arch).eval()
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        # a one-token prompt, and a longer one; a prefix-LM's prompt holds its whole prefix (3),
        # whose positions attend to each other both ways
        for first in (3, 5) if "prefix_lm" in masks else (1, 5):
            torch.testing.assert_close(decode_stepwise(model, tokens, first), full, atol=1e-5, rtol=1e-4)


def test_cached_decoding_equals_the_full_forward_on_random_multi_layer_decoders():
    rng = random.Random(3)
    checked = 0
    while checked < 12:
        arch = random_config(rng)
        if arch.kind != "decoder":
            continue
        model = build_model(arch).eval()
        tokens = torch.randint(0, arch.vocab_size, (2, min(arch.max_seq_len, 10)))
        with torch.no_grad():
            torch.testing.assert_close(decode_stepwise(model, tokens, 2), model(tokens), atol=1e-5, rtol=1e-4)
        checked += 1


def test_the_reference_path_reads_the_cache_too():
    arch = attention_config(masks=("causal",), positions="alibi", kind="decoder")
    model = build_model(arch).eval()
    for module in model.modules():
        if hasattr(module, "path"):
            module.path = "reference"
    tokens = torch.randint(0, arch.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(decode_stepwise(model, tokens, 3), model(tokens), atol=1e-5, rtol=1e-4)
