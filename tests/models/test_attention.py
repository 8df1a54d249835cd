"""The fused and reference paths, masks that must not leak, and parity with PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkvsearch.models import build_model, capture_attention, set_attention_path
from qkvsearch.models.masks import MaskContext
from tests.models.helpers import all_combinations, attention_config

COMBINATIONS = all_combinations()


def _tokens(seq: int = 10, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (batch, seq), generator=gen)
    lengths = torch.tensor([seq, seq - 3, 2])[:batch]
    padding_mask = torch.arange(seq)[None, :] < lengths[:, None]  # True at real tokens
    return tokens, padding_mask


def _model(config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config).double().eval()


@pytest.mark.parametrize(("scaling", "masks", "positions"), COMBINATIONS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_fused_equals_reference_and_gradients_reach_every_parameter(scaling, masks, positions):
    model = _model(attention_config(masks=masks, scaling=scaling, positions=positions))
    tokens, padding_mask = _tokens()
    fused = model(tokens, padding_mask)
    set_attention_path(model, "reference")
    reference = model(tokens, padding_mask)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)

    set_attention_path(model, "fused")
    model(tokens, padding_mask).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_the_combinations_cover_every_registered_component():
    from qkvsearch.models import MASKS, POSITIONS, SCALINGS

    assert {c[0] for c in COMBINATIONS} == set(SCALINGS.names())
    assert {c[2] for c in COMBINATIONS} == set(POSITIONS.names())
    assert {m for c in COMBINATIONS for m in c[1]} == set(MASKS.names()) - {"none"}
    assert ("causal", "padding", "sliding_window") in {c[1] for c in COMBINATIONS}


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("masks", [(), ("causal",), ("causal", "sliding_window")])
def test_grouped_and_multi_query_attention_paths_agree(n_kv_heads, masks):
    config = attention_config(masks=masks, n_heads=4, n_kv_heads=n_kv_heads, d_k=6, d_v=3)
    model = _model(config)
    attention = model.stack.layers[0].self_attention
    assert attention.project.sizes == [4 * 6, n_kv_heads * 6, n_kv_heads * 3]  # q, k, v
    assert attention.project.qkv.out_features == sum(attention.project.sizes)
    tokens, _ = _tokens()
    fused = model(tokens)
    with capture_attention(model) as weights:
        reference = model(tokens)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    (captured,) = weights.values()
    assert captured.shape == (3, 4, 10, 10)
    torch.testing.assert_close(captured.sum(-1), torch.ones(3, 4, 10, dtype=torch.float64))


@pytest.mark.parametrize("positions", ["none", "sinusoidal", "learned", "rotary", "alibi"])
@pytest.mark.parametrize("masks", [("causal",), ("causal", "sliding_window"), ("prefix_lm",)])
def test_masks_do_not_leak_future_or_out_of_window_tokens(positions, masks):
    model = _model(attention_config(masks=masks, positions=positions, kind="decoder"))
    tokens, _ = _tokens(seq=12, batch=1)
    base = model(tokens)
    for position in range(12):
        changed = tokens.clone()
        changed[0, position] = (changed[0, position] + 1) % 11
        delta = (model(changed) - base).abs().amax(-1)[0]  # [seq]
        for query in range(12):
            visible = _visible(masks, query, position)
            assert (delta[query] > 1e-9) == visible, (query, position)


def _visible(masks: tuple[str, ...], query: int, key: int) -> bool:
    """What a one-layer model's output at ``query`` may depend on (window 3, prefix 3)."""
    if query == key:
        return True
    if "prefix_lm" in masks:
        return key <= query or key < 3
    return key <= query and ("sliding_window" not in masks or query - key < 3)


@pytest.mark.parametrize("masks", [("padding",), ("causal", "padding"), ("sliding_window", "padding"), ("prefix_lm", "padding")])
def test_padded_positions_do_not_change_real_outputs(masks):
    model = _model(attention_config(masks=masks, positions="rotary"))
    tokens, padding_mask = _tokens(seq=10, batch=3)
    base = model(tokens, padding_mask)
    noise = torch.randint(0, 11, tokens.shape, generator=torch.Generator().manual_seed(1))
    changed = torch.where(padding_mask, tokens, noise)
    assert not torch.equal(changed, tokens)
    after = model(changed, padding_mask)
    torch.testing.assert_close(after[padding_mask], base[padding_mask], rtol=0, atol=1e-12)
    assert (after[~padding_mask] - base[~padding_mask]).abs().max() > 1e-6


def test_padding_mask_is_ignored_without_the_padding_component():
    model = _model(attention_config(masks=()))
    tokens, padding_mask = _tokens()
    torch.testing.assert_close(model(tokens, padding_mask), model(tokens))


def test_every_row_of_a_combined_mask_sees_at_least_one_key():
    config = attention_config(masks=("sliding_window", "padding"))
    mask = build_model(config).stack.layers[0].self_attention.mask
    _, padding_mask = _tokens(seq=10, batch=3)
    visible, _ = mask(MaskContext(10, 10, torch.device("cpu"), padding_mask))
    assert visible.shape == (3, 1, 10, 10)
    assert visible.any(-1).all()


def _copy_from_torch_mha(attention, reference: nn.MultiheadAttention) -> None:
    with torch.no_grad():  # both keep q, k and v as one projection, in that order
        attention.project.qkv.weight.copy_(reference.in_proj_weight)
        attention.project.qkv.bias.copy_(reference.in_proj_bias)
        attention.out_proj.weight.copy_(reference.out_proj.weight)
        attention.out_proj.bias.copy_(reference.out_proj.bias)


@pytest.mark.parametrize("causal", [False, True])
def test_classic_attention_matches_torch_multihead_attention(causal):
    config = attention_config(masks=("causal",) if causal else (), d_model=16, n_heads=4, bias=True)
    attention = _model(config).stack.layers[0].self_attention
    torch.manual_seed(1)
    reference = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    _copy_from_torch_mha(attention, reference)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64) if causal else None
    expected, _ = reference(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attention(x), expected)


def test_classic_block_matches_torch_transformer_encoder_layer():
    config = attention_config(masks=("padding",), d_model=16, n_heads=4, bias=True)
    config_dict = config.to_dict()
    config_dict.update(norm_placement="post", norm="layernorm")
    config_dict["encoder"]["ffn"] = {"name": "relu", "d_ff": 24}
    model = _model(config_dict)
    block = model.stack.layers[0]
    torch.manual_seed(2)
    reference = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True).double().eval()
    _copy_from_torch_mha(block.self_attention, reference.self_attn)
    with torch.no_grad():
        block.feedforward.up.load_state_dict(reference.linear1.state_dict())
        block.feedforward.down.load_state_dict(reference.linear2.state_dict())
        block.self_residual.norm.load_state_dict(reference.norm1.state_dict())
        block.ffn_residual.norm.load_state_dict(reference.norm2.state_dict())
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    padding_mask = torch.arange(7)[None, :] < torch.tensor([[7], [4]])
    expected = reference(x, src_key_padding_mask=~padding_mask)
    got = block(x, padding_mask)
    torch.testing.assert_close(got[padding_mask], expected[padding_mask])


def test_an_all_padding_source_gives_the_same_finite_output_on_both_paths():
    """Cross-attention to a source that is all padding: no key to attend to. Both paths
    give zeros for it (the fused path always did; the reference path gave NaN)."""
    from qkvsearch.models import ArchConfig, build_model, capture_attention

    arch = ArchConfig.from_dict({
        "kind": "encoder_decoder", "vocab_size": 12, "max_seq_len": 8, "d_model": 16,
        "encoder": {"n_layers": 1, "attention": {"n_heads": 2, "masks": ["padding"]}},
        "decoder": {"n_layers": 1, "attention": {"n_heads": 2, "masks": ["causal", "padding"]},
                    "cross_attention": {"n_heads": 2, "masks": ["padding"]}},
    })
    torch.manual_seed(0)
    model = build_model(arch).eval()
    src, tgt = torch.randint(0, 12, (2, 6)), torch.randint(0, 12, (2, 5))
    src_padding = torch.tensor([[False] * 6, [True] * 6])  # the first source is all padding
    tgt_padding = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        fused = model(src, tgt, src_padding, tgt_padding)
        with capture_attention(model) as weights:
            reference = model(src, tgt, src_padding, tgt_padding)
    assert torch.isfinite(reference).all() and torch.isfinite(fused).all()
    torch.testing.assert_close(reference, fused, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(w).all() for w in weights.values())
