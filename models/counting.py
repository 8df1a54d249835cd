"""Analytic parameter and FLOP counts, from the config alone (no module is built).

FLOPs follow Kaplan et al. (2020, "Scaling Laws for Neural Language Models", Table 1):
a forward pass costs two FLOPs per multiply-accumulate, so ``2 * W`` per token for the
matrix weights ``W`` it multiplies by. Attention adds ``2 * n_heads * n_ctx * d_k`` for
the scores and ``2 * n_heads * n_ctx * d_v`` for the weighted sum of values, counting the
second as Hoffmann et al. (2022, Appendix F) do. Here ``n_ctx`` is ``max_seq_len``,
the keys a dense kernel scores each query against; norms, softmax, activations and
embedding lookups are left out, as there. For an encoder-decoder the count is per
source token plus per target token. Backward costs about twice the forward.
"""

from __future__ import annotations

from qkvsearch.models.config import ArchConfig, AttentionConfig, LayerConfig, StackConfig


def _attention_weights(config: AttentionConfig, d_model: int) -> int:
    """Weights of the four projections of one attention layer."""
    h, g, d_k, d_v = config.n_heads, config.n_kv_heads, config.d_k, config.d_v
    return d_model * (h * d_k + g * d_k + g * d_v) + h * d_v * d_model


def _attention_params(config: AttentionConfig, d_model: int) -> int:
    h, g, d_k, d_v = config.n_heads, config.n_kv_heads, config.d_k, config.d_v
    biases = (h * d_k + g * d_k + g * d_v + d_model) if config.bias else 0
    return _attention_weights(config, d_model) + biases + config.scaling.n_params(h, d_k)


def _attentions(layer: LayerConfig) -> list[AttentionConfig]:
    return [a for a in (layer.attention, layer.cross_attention) if a is not None]


def _stack_params(config: ArchConfig, stack: StackConfig) -> int:
    d = config.d_model
    total = config.vocab_size * d + config.positions.n_params(d, config.max_seq_len)
    for layer in stack.layers:
        attentions = _attentions(layer)
        total += sum(_attention_params(a, d) for a in attentions)
        total += layer.ffn.n_params(d)
        total += (len(attentions) + 1) * config.norm.n_params(d)  # one norm per residual
    if config.norm_placement.final_norm:
        total += config.norm.n_params(d)
    return total


def count_parameters(config: ArchConfig) -> int:
    """Returns the number of distinct parameters of ``build_model(config)``.

    Tied weights count once, as ``sum(p.numel() for p in model.parameters())`` does.
    """
    total = sum(_stack_params(config, stack) for stack in config.stacks.values())
    return total + config.head.n_params(config.d_model, config.vocab_size, config.tie_embeddings)


def _stack_flops(config: ArchConfig, stack: StackConfig) -> int:
    d, n_ctx = config.d_model, config.max_seq_len
    flops = 0
    for layer in stack.layers:
        for attention in _attentions(layer):
            flops += 2 * _attention_weights(attention, d)
            flops += 2 * attention.n_heads * n_ctx * (attention.d_k + attention.d_v)
        flops += 2 * layer.ffn.matmul_params(d)
    return flops


def flops_per_token(config: ArchConfig) -> int:
    """Returns the forward-pass FLOPs per token (see the module docstring for the convention)."""
    flops = sum(_stack_flops(config, stack) for stack in config.stacks.values())
    outputs = config.head.n_outputs(config.vocab_size)
    head = 2 * config.d_model * outputs
    # a pooled head runs once per sequence: spread it over the sequence's tokens
    return flops + (head if config.head.per_token else -(-head // config.max_seq_len))
