"""Small configs shared by the model tests."""

from __future__ import annotations

import itertools
import random
from typing import Any

from qkvsearch.models import MASKS, POSITIONS, SCALINGS, ArchConfig, ConfigError

#: Parameters for mask entries that need one, chosen to bite at test sizes.
MASK_SETTINGS: dict[str, dict[str, Any]] = {"sliding_window": {"window": 3}, "prefix_lm": {"prefix_len": 3}}


def mask_sets() -> list[tuple[str, ...]]:
    """Every combination of registered masks (up to three) that a config accepts."""
    names = [n for n in MASKS.names() if n != "none"]
    combos = [()] + [c for r in (1, 2, 3) for c in itertools.combinations(names, r)]
    valid = []
    for combo in combos:
        try:
            attention_config(masks=combo, d_model=16, n_heads=2)
        except ConfigError:
            continue
        valid.append(combo)
    return valid


def mask_entries(names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"name": n, **MASK_SETTINGS.get(n, {})} for n in names]


def attention_config(
    *, masks=(), scaling="sqrt_dk", positions="none", d_model=16, n_heads=4, kind="encoder", **attention
) -> ArchConfig:
    """A one-layer config whose attention is the subject of a test."""
    stack = {"n_layers": 1, "attention": {"n_heads": n_heads, "scaling": scaling, "masks": mask_entries(masks), **attention}}
    return ArchConfig.from_dict(
        {"kind": kind, "vocab_size": 11, "max_seq_len": 16, "d_model": d_model, "positions": positions, kind: stack}
    )


def all_combinations() -> list[tuple[str, tuple[str, ...], str]]:
    """Every registered (scaling, mask set, positions) combination that is valid."""
    return list(itertools.product(SCALINGS.names(), mask_sets(), POSITIONS.names()))


def random_config(rng: random.Random) -> ArchConfig:
    """A random valid config over every registered component, heterogeneous per layer."""
    kind = rng.choice(["encoder", "decoder", "encoder_decoder"])
    d_model = rng.choice([8, 12, 16, 24])

    def attention(causal: bool) -> dict[str, Any]:
        n_kv = rng.choice([1, 2])
        masks = ["causal"] if causal else []
        if rng.random() < 0.3:
            masks.append({"name": "sliding_window", "window": rng.randint(1, 5)})
        return {
            "n_heads": n_kv * rng.choice([1, 2, 3]),
            "n_kv_heads": n_kv,
            "d_k": rng.choice([2, 4, 6]),
            "d_v": rng.choice([2, 3, 4]),
            "bias": rng.random() < 0.5,
            "scaling": rng.choice(SCALINGS.names()),
            "masks": masks,
        }

    def stack(decoder: bool) -> dict[str, Any]:
        n_layers = rng.randint(1, 3)
        layers = []
        for _ in range(n_layers):
            layer = {
                "attention": attention(decoder),
                "ffn": {"name": rng.choice(["gelu", "relu", "squared_relu", "swiglu"]), "d_ff": rng.randint(4, 40), "bias": rng.random() < 0.5},
            }
            if decoder and kind == "encoder_decoder":
                layer["cross_attention"] = {**attention(False), "masks": rng.choice([[], ["padding"]])}
            layers.append(layer)
        return {"n_layers": n_layers, "layers": layers}

    config: dict[str, Any] = {
        "kind": kind,
        "vocab_size": rng.randint(5, 40),
        "max_seq_len": rng.randint(8, 32),
        "d_model": d_model,
        "positions": rng.choice(POSITIONS.names()),
        "norm": rng.choice(["layernorm", "rmsnorm"]),
        "norm_placement": rng.choice(["pre", "post"]),
    }
    if kind in ("encoder", "encoder_decoder"):
        config["encoder"] = stack(False)
    if kind in ("decoder", "encoder_decoder"):
        config["decoder"] = stack(True)
    if kind == "encoder" and rng.random() < 0.5:
        config["head"] = {"name": "classifier", "n_classes": rng.randint(2, 5)}
    else:
        config["tie_embeddings"] = rng.random() < 0.5
    return ArchConfig.from_dict(config)
