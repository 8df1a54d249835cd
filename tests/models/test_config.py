"""Configs: round trips, analytic counts, and the errors bad configs raise."""

from __future__ import annotations

import random

import pytest
import torch
import yaml

from qkvsearch.models import (
    REGISTRIES,
    ArchConfig,
    ConfigError,
    build_model,
    count_parameters,
    flops_per_token,
)
from tests.models.helpers import attention_config, random_config

SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
def test_analytic_parameter_count_equals_the_built_module(seed):
    config = random_config(random.Random(seed))
    model = build_model(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seed", SEEDS)
def test_configs_round_trip_through_dicts_and_yaml(seed):
    config = random_config(random.Random(seed))
    data = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    assert ArchConfig.from_dict(data) == config
    assert ArchConfig.from_dict(data).to_dict() == config.to_dict()


@pytest.mark.parametrize("seed", range(10))
def test_random_configs_run_forward_with_the_declared_output_shape(seed):
    config = random_config(random.Random(seed))
    model = build_model(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, config.max_seq_len))
    args = (tokens, tokens) if config.kind == "encoder_decoder" else (tokens,)
    out = model(*args)
    outputs = config.head.n_outputs(config.vocab_size)
    expected = (2, outputs) if not config.head.per_token else (2, config.max_seq_len, outputs)
    assert out.shape == expected
    assert torch.isfinite(out).all()


def test_per_layer_settings_build_heterogeneous_layers():
    config = ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": 20, "max_seq_len": 16, "d_model": 24,
        "decoder": {
            "n_layers": 3,
            "attention": {"n_heads": 4, "masks": ["causal"]},
            "ffn": {"name": "gelu", "d_ff": 48},
            "layers": [{}, {"attention": {"n_heads": 2, "n_kv_heads": 1}}, {"ffn": {"name": "swiglu", "d_ff": 40}}],
        },
    })
    layers = build_model(config).stack.layers
    assert [layer.self_attention.n_heads for layer in layers] == [4, 2, 4]
    assert [layer.self_attention.d_k for layer in layers] == [6, 12, 6]
    assert layers[1].self_attention.n_kv_heads == 1
    assert layers[2].feedforward.gate.out_features == 40
    assert layers[0].feedforward.up.out_features == 48


def test_flops_per_token_follows_the_documented_formula():
    d, h, d_k, d_v, n_kv, d_ff, vocab, ctx, n_layers = 32, 4, 8, 6, 2, 64, 50, 20, 3
    config = ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": vocab, "max_seq_len": ctx, "d_model": d,
        "decoder": {
            "n_layers": n_layers,
            "attention": {"n_heads": h, "d_k": d_k, "d_v": d_v, "n_kv_heads": n_kv, "masks": ["causal"]},
            "ffn": {"name": "swiglu", "d_ff": d_ff},
        },
    })
    projections = d * (h * d_k + n_kv * d_k + n_kv * d_v) + h * d_v * d
    per_layer = 2 * projections + 2 * h * ctx * (d_k + d_v) + 2 * 3 * d * d_ff
    assert flops_per_token(config) == n_layers * per_layer + 2 * d * vocab


def test_tied_embeddings_share_one_tensor():
    config = attention_config(kind="decoder", masks=("causal",)).to_dict()
    config["tie_embeddings"] = True
    model = build_model(config)
    assert model.head.proj.weight is model.stack.embedding.weight
    assert count_parameters(ArchConfig.from_dict(config)) == sum(p.numel() for p in model.parameters())


def _decoder(**attention) -> dict:
    return {
        "kind": "decoder", "vocab_size": 10, "max_seq_len": 8, "d_model": 16,
        "decoder": {"n_layers": 2, "attention": {"masks": ["causal"], **attention}},
    }


BAD_CONFIGS = [
    (_decoder(d_k=0), r"decoder\.layers\[0\]\.attention\.d_k: must be >= 1, got 0"),
    (_decoder(n_heads=0), r"attention\.n_heads: must be >= 1, got 0"),
    (_decoder(n_heads=3), r"d_model \(16\) must be divisible by n_heads \(3\).*valid n_heads: 1, 2, 4, 8, 16"),
    (_decoder(n_heads=4, n_kv_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\); valid n_kv_heads: 1, 2, 4"),
    (_decoder(masks=["causal", {"name": "sliding_window", "window": 0}]), r"window: must be >= 1, got 0"),
    (_decoder(masks=[{"name": "prefix_lm"}, {"name": "sliding_window", "window": 4}]), r"sliding_window.*undefined inside the bidirectional prefix"),
    (_decoder(masks=["causal", "prefix_lm"]), r"causal cannot combine with prefix_lm"),
    (_decoder(masks=["causal", "causal"]), r"'causal' is listed more than once"),
    (_decoder(masks=[{"name": "prefix_lm", "prefix_len": 8}]),
     r"masks\[0\]\.prefix_len: 8 must be below max_seq_len \(8\): a prefix of the whole sequence leaves no next token"),
    (_decoder(masks=[]), r"decoder's self-attention needs a causal or prefix_lm mask"),
    (_decoder(masks=["causal", "sliding"]), r"unknown mask 'sliding'; available: none, causal, padding, sliding_window, prefix_lm"),
    (_decoder(scaling="sqrt"), r"unknown scaling 'sqrt'; available: sqrt_dk, inv_dk, none, learned_temperature, qk_norm"),
    (_decoder(n_head=4), r"attention\.n_head: unknown key; valid keys: n_heads, d_k"),
    (_decoder(d_k="8"), r"attention\.d_k: expected int, got '8'"),
    (_decoder(dropout=1.5), r"attention\.dropout: must be in \[0, 1\), got 1.5"),
    ({**_decoder(d_k=7), "positions": "rotary"}, r"rotary positions need an even d_k, got 7"),
    ({**_decoder(), "positions": "learnt"}, r"unknown positions 'learnt'; available: none, sinusoidal, learned, rotary, alibi"),
    ({**_decoder(), "kind": "gpt"}, r"kind: 'gpt' is not valid; choose one of encoder, decoder, encoder_decoder"),
    ({**_decoder(), "d_modle": 4}, r"d_modle: unknown key"),
    ({**_decoder(), "head": {"name": "classifier", "n_classes": 3}}, r"kind 'decoder' needs a per-token head"),
    ({**_decoder(), "encoder": {"n_layers": 1}}, r"encoder: kind 'decoder' cannot have a encoder stack"),
    ({**_decoder(), "head": {"name": "classifier"}, "kind": "encoder", "tie_embeddings": True}, r"tie_embeddings: head 'classifier' cannot be tied"),
    ({**_decoder(), "decoder": {"n_layers": 0}}, r"decoder\.n_layers: must be an int >= 1, got 0"),
    ({**_decoder(), "decoder": {"n_layers": 2, "layers": [{}]}}, r"decoder\.layers: must list one override mapping per layer \(2\)"),
    ({**_decoder(), "decoder": {"n_layers": 1, "ffn": {"name": "geglu"}}}, r"unknown feed-forward 'geglu'; available: gelu, relu, squared_relu, swiglu"),
    (
        {"kind": "encoder_decoder", "vocab_size": 10, "max_seq_len": 8, "d_model": 16, "encoder": {"n_layers": 1},
         "decoder": {"n_layers": 1, "attention": {"masks": ["causal"]}, "cross_attention": {"masks": ["causal"]}}},
        r"cross_attention\.masks\[0\]: mask 'causal' is undefined in cross-attention",
    ),
    (
        {"kind": "encoder_decoder", "vocab_size": 10, "max_seq_len": 8, "d_model": 16, "encoder": {"n_layers": 1},
         "decoder": {"n_layers": 1, "attention": {"masks": ["causal"]}}},
        r"decoder\.layers\[0\]\.cross_attention: a decoder layer of kind 'encoder_decoder' needs cross-attention",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_configs_raise_a_value_error_naming_field_value_and_valid_options(data, message):
    with pytest.raises(ValueError, match=message):
        build_model(data)


def test_all_problems_of_a_config_are_reported_together():
    unparsable = {**_decoder(d_k="x"), "positions": "nope", "kind": "gpt"}
    with pytest.raises(ConfigError) as info:
        ArchConfig.from_dict(unparsable)
    assert {p.split(":")[0] for p in info.value.problems} == {
        "kind", "positions.name", "decoder.layers[0].attention.d_k", "decoder.layers[1].attention.d_k"
    }
    invalid = {**_decoder(n_heads=0, masks=[]), "vocab_size": 0}
    with pytest.raises(ConfigError) as info:
        ArchConfig.from_dict(invalid)
    fields = [p.split(":")[0] for p in info.value.problems]
    assert "vocab_size" in fields and "decoder.layers[1].attention.n_heads" in fields
    assert "decoder.layers[0].attention.masks" in fields


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registry_lists_its_names_and_rejects_duplicates(kind):
    registry = REGISTRIES[kind]
    assert registry.names()
    name = registry.names()[0]
    with pytest.raises(ValueError, match=f"'{name}' is already registered"):
        registry.register(name, registry.config_class(name))(lambda config: None)
