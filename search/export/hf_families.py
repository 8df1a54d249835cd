"""Hugging Face model families an architecture can be written as exactly, without remote code.

A family maps an architecture only when the family's model computes exactly the same
function: same positions, norm and its placement, attention scaling and masks, feed-forward,
head geometry, every layer alike. Each family says, for an architecture, what stands in the
way (:meth:`Family.problems`), the ``config.json`` settings, and where each of our weights
goes in its state dict. Anything else is exported with remote code (``hf_remote.py``).

| our component | Llama | Mistral | GPT-2 |
| --- | --- | --- | --- |
| positions | rotary (`rope_theta` = base) | rotary | learned (`wpe`, `n_positions` = max_seq_len) |
| norm, placement | RMSNorm, pre (`rms_norm_eps`) | RMSNorm, pre | LayerNorm, pre (`layer_norm_epsilon`) |
| scaling | sqrt_dk | sqrt_dk | sqrt_dk |
| masks | causal | causal + sliding_window (`sliding_window`) | causal |
| feed-forward | swiglu (`mlp_bias`) | swiglu, no bias | gelu (exact: `activation_function: gelu`) |
| heads | any n_kv_heads (`num_key_value_heads`), d_k (`head_dim`), d_v = d_k | same | n_kv_heads = n_heads, d_k = d_model / n_heads |
| projection biases | `attention_bias` | none | written as zeros where ours have none |
| tied embeddings | `tie_word_embeddings` | same | same |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from qkvsearch.models import ArchConfig, LayerConfig


def _layers(arch: ArchConfig) -> list[LayerConfig]:
    return list(arch.stacks["decoder"].layers) if arch.kind == "decoder" else []


def _common(arch: ArchConfig, positions: str, norm: str, ffn: str, masks: list[list[str]]) -> list[str]:
    """What keeps a decoder from a family of this kind (empty: nothing)."""
    if arch.kind != "decoder" or arch.head.name != "lm":
        return [f"a {arch.kind} with a {arch.head.name} head, not a decoder language model"]
    layers = _layers(arch)
    first = layers[0]
    problems = []
    if arch.positions.name != positions:
        problems.append(f"positions are {arch.positions.name}, not {positions}")
    if arch.norm.name != norm or arch.norm_placement.name != "pre":
        problems.append(f"norm is {arch.norm_placement.name}-{arch.norm.name}, not pre-{norm}")
    if any(layer != first for layer in layers):
        problems.append("its layers differ from one another (heads or widths per layer)")
    attention = first.attention
    if attention.scaling.name != "sqrt_dk":
        problems.append(f"scaling is {attention.scaling.name}, not sqrt_dk")
    if [m.name for m in attention.masks] not in masks:
        problems.append(f"masks are {[m.name for m in attention.masks]}, not one of {masks}")
    if first.ffn.name != ffn:
        problems.append(f"the feed-forward is {first.ffn.name}, not {ffn}")
    if attention.d_v != attention.d_k:
        problems.append(f"d_v ({attention.d_v}) differs from d_k ({attention.d_k})")
    if arch.dropout or attention.dropout:
        problems.append("it trains with dropout")
    return problems


def _split_qkv(state: dict[str, torch.Tensor], prefix: str, arch: ArchConfig) -> list[torch.Tensor | None]:
    """The fused projection's weight and bias split into q, k and v (bias None without one)."""
    a = arch.stacks["decoder"].layers[0].attention
    sizes = [a.n_heads * a.d_k, a.n_kv_heads * a.d_k, a.n_kv_heads * a.d_v]
    weight = state[f"{prefix}self_attention.project.qkv.weight"].split(sizes)
    bias = state.get(f"{prefix}self_attention.project.qkv.bias")
    return [*weight, *(bias.split(sizes) if bias is not None else (None, None, None))]


@dataclasses.dataclass(frozen=True)
class Family:
    """One family: its ``model_type``, its check, its config and weights, and the module
    names a LoRA adapter targets by custom."""

    name: str
    model_type: str
    lora_modules: tuple[str, ...]
    problems: Callable[[ArchConfig], list[str]]
    config: Callable[[ArchConfig], dict[str, Any]]
    weights: Callable[[ArchConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _llama_problems(arch: ArchConfig, sliding: bool = False) -> list[str]:
    masks = [["causal", "sliding_window"], ["sliding_window", "causal"]] if sliding else [["causal"]]
    problems = _common(arch, "rotary", "rmsnorm", "swiglu", masks)
    if not problems:
        a = _layers(arch)[0].attention
        if arch.d_model % a.n_heads:
            problems.append(f"d_model ({arch.d_model}) is not a multiple of n_heads ({a.n_heads}), which the config requires")
        if sliding and _layers(arch)[0].ffn.bias:
            problems.append("its feed-forward has biases (Mistral's has none)")
    return problems


def _llama_config(arch: ArchConfig) -> dict[str, Any]:
    layer = _layers(arch)[0]
    a, window = layer.attention, next((m for m in layer.attention.masks if m.name == "sliding_window"), None)
    config = {
        "vocab_size": arch.vocab_size, "hidden_size": arch.d_model, "intermediate_size": layer.ffn.d_ff,
        "num_hidden_layers": len(_layers(arch)), "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.d_k, "max_position_embeddings": arch.max_seq_len, "rms_norm_eps": arch.norm.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.positions.base},
        "tie_word_embeddings": arch.tie_embeddings, "attention_bias": a.bias, "hidden_act": "silu",
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if window is not None:
        config["sliding_window"] = window.window
    else:
        config["mlp_bias"] = layer.ffn.bias
    return config


def _llama_weights(arch: ArchConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["stack.embedding.weight"], "model.norm.weight": state["stack.final_norm.weight"],
           "lm_head.weight": state["head.proj.weight"]}
    for i in range(len(_layers(arch))):
        ours, theirs = f"stack.layers.{i}.", f"model.layers.{i}."
        q, k, v, qb, kb, vb = _split_qkv(state, ours, arch)
        for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{theirs}self_attn.{name}.weight"] = weight
            if bias is not None:
                out[f"{theirs}self_attn.{name}.bias"] = bias
        for kind in ("weight", "bias"):
            if f"{ours}self_attention.out_proj.{kind}" in state:
                out[f"{theirs}self_attn.o_proj.{kind}"] = state[f"{ours}self_attention.out_proj.{kind}"]
            for mine, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                if f"{ours}feedforward.{mine}.{kind}" in state:
                    out[f"{theirs}mlp.{hf_name}.{kind}"] = state[f"{ours}feedforward.{mine}.{kind}"]
        out[f"{theirs}input_layernorm.weight"] = state[f"{ours}self_residual.norm.weight"]
        out[f"{theirs}post_attention_layernorm.weight"] = state[f"{ours}ffn_residual.norm.weight"]
    return out


def _gpt2_problems(arch: ArchConfig) -> list[str]:
    problems = _common(arch, "learned", "layernorm", "gelu", [["causal"]])
    if not problems:
        a = _layers(arch)[0].attention
        if a.n_kv_heads != a.n_heads:
            problems.append(f"n_kv_heads ({a.n_kv_heads}) differs from n_heads ({a.n_heads}): GPT-2 has no grouped heads")
        if a.n_heads * a.d_k != arch.d_model:
            problems.append(f"n_heads x d_k ({a.n_heads * a.d_k}) differs from d_model ({arch.d_model})")
    return problems


def _gpt2_config(arch: ArchConfig) -> dict[str, Any]:
    layer = _layers(arch)[0]
    return {"vocab_size": arch.vocab_size, "n_positions": arch.max_seq_len, "n_embd": arch.d_model,
            "n_layer": len(_layers(arch)), "n_head": layer.attention.n_heads, "n_inner": layer.ffn.d_ff,
            "activation_function": "gelu", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "layer_norm_epsilon": arch.norm.eps, "tie_word_embeddings": arch.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None}


def _gpt2_weights(arch: ArchConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D keeps weights as ``[in, out]`` (ours ``[out, in]``) and always has biases:
    ours are transposed, and biases we do not have are zeros (the same function)."""
    def conv(prefix: str, ours: str) -> dict[str, torch.Tensor]:
        weight = state[f"{ours}.weight"]
        bias = state.get(f"{ours}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
        return {f"{prefix}.weight": weight.T.contiguous(), f"{prefix}.bias": bias}

    out = {"transformer.wte.weight": state["stack.embedding.weight"], "transformer.wpe.weight": state["stack.positions.table.weight"],
           "transformer.ln_f.weight": state["stack.final_norm.weight"], "transformer.ln_f.bias": state["stack.final_norm.bias"],
           "lm_head.weight": state["head.proj.weight"]}
    for i in range(len(_layers(arch))):
        ours, theirs = f"stack.layers.{i}.", f"transformer.h.{i}."
        for norm, residual in (("ln_1", "self_residual"), ("ln_2", "ffn_residual")):
            out[f"{theirs}{norm}.weight"] = state[f"{ours}{residual}.norm.weight"]
            out[f"{theirs}{norm}.bias"] = state[f"{ours}{residual}.norm.bias"]
        out.update(conv(f"{theirs}attn.c_attn", f"{ours}self_attention.project.qkv"))
        out.update(conv(f"{theirs}attn.c_proj", f"{ours}self_attention.out_proj"))
        out.update(conv(f"{theirs}mlp.c_fc", f"{ours}feedforward.up"))
        out.update(conv(f"{theirs}mlp.c_proj", f"{ours}feedforward.down"))
    return out


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llama", ("q_proj", "v_proj"), _llama_problems, _llama_config, _llama_weights),
    "mistral": Family("mistral", "mistral", ("q_proj", "v_proj"), lambda a: _llama_problems(a, sliding=True),
                      _llama_config, _llama_weights),
    "gpt2": Family("gpt2", "gpt2", ("c_attn",), _gpt2_problems, _gpt2_config, _gpt2_weights),
}


def fitting(arch: ArchConfig) -> tuple[Family | None, dict[str, list[str]]]:
    """The first family the architecture fits exactly, and for every family what kept it out."""
    why = {name: family.problems(arch) for name, family in FAMILIES.items()}
    chosen = next((FAMILIES[name] for name, problems in why.items() if not problems), None)
    return chosen, why
