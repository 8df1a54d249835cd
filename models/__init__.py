"""The configurable Transformer: attention components, blocks, models, analytic counts.

This package depends on torch alone.
"""

from models.attention import MultiHeadAttention
from models.capture import capture_attention, set_attention_path
from models.config import ArchConfig, AttentionConfig, LayerConfig, StackConfig
from models.counting import count_parameters, flops_per_token
from models.feedforward import FEEDFORWARDS
from models.heads import HEADS
from models.masks import MASKS
from models.norms import NORMS, PLACEMENTS
from models.positions import POSITIONS
from models.registry import ConfigError, Registry
from models.scaling import SCALINGS
from models.transformer import EncoderDecoderModel, StackModel, build_model

#: Every component registry, by the config field that chooses from it.
REGISTRIES: dict[str, Registry] = {
    "scaling": SCALINGS,
    "masks": MASKS,
    "positions": POSITIONS,
    "ffn": FEEDFORWARDS,
    "norm": NORMS,
    "norm_placement": PLACEMENTS,
    "head": HEADS,
}

__all__ = [
    "FEEDFORWARDS",
    "HEADS",
    "MASKS",
    "NORMS",
    "PLACEMENTS",
    "POSITIONS",
    "REGISTRIES",
    "SCALINGS",
    "ArchConfig",
    "AttentionConfig",
    "ConfigError",
    "EncoderDecoderModel",
    "LayerConfig",
    "MultiHeadAttention",
    "Registry",
    "StackConfig",
    "StackModel",
    "build_model",
    "capture_attention",
    "count_parameters",
    "flops_per_token",
    "set_attention_path",
]
