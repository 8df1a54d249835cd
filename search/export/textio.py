"""Text in and out of an exported model: the code ``qkv export`` copies into ``model.py``.

These functions take the model and token ids, and call nothing of qkvsearch but
:mod:`qkvsearch.tasks.tokenizer` (whose source the export copies too), so they run
unchanged in an export and here, where the export checks a fresh process against them.
"""

from __future__ import annotations

import torch
from torch import nn

from qkvsearch.tasks.tokenizer import padded_rows


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """The next token from ``[vocab]`` logits: the most likely at temperature 0, else sampled
    from the ``top_k`` most likely (all when None) at that temperature."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate_ids(net: nn.Module, ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, window: int, prefix: int = 0) -> list[int]:
    """Continues ``ids`` by ``max_new_tokens`` tokens; returns the new ones.

    The prompt runs once, filling a key/value cache; each new token then costs one
    position's forward. The model sees at most ``window`` positions (its ``max_seq_len``):
    when the cache is full, it starts again from the latest ``window // 2`` tokens. A
    prefix-LM's first ``prefix`` positions attend to each other both ways, so until that
    many tokens exist every step runs the whole sequence, without a cache.
    """
    if not ids:
        raise ValueError("generate: the prompt holds no token; give some text")
    if max_new_tokens < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"generate: max_new_tokens must be >= 0 (got {max_new_tokens}) and top_k >= 1 or None (got {top_k})")
    device = next(net.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    tokens, cache = list(ids), None
    for _ in range(max_new_tokens):
        if cache is not None and cache[0].length < window:
            logits = net(torch.tensor([tokens[-1:]], device=device), cache=cache)
        else:  # the first step, a prefix still open, or a full window
            context = tokens[-window:] if cache is None else tokens[-max(1, window // 2):]
            cache = net.stack.new_cache() if len(context) >= prefix else None
            logits = net(torch.tensor([context], device=device), cache=cache)
        tokens.append(sample_token(logits[0, -1], temperature, top_k, generator))
    return tokens[len(ids):]


@torch.no_grad()
def classify_ids(net: nn.Module, rows: list[list[int]], seq_len: int) -> torch.Tensor:
    """``[len(rows), n_classes]`` class probabilities of token rows, each cut and padded to
    ``seq_len`` with a padding mask (an empty row is one token 0), as the task made them."""
    tokens, mask = padded_rows(rows, seq_len, next(net.parameters()).device)
    return net(tokens, mask).float().softmax(-1)
