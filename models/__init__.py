"""The configurable Transformer: attention components, blocks, models, analytic counts.

This package depends on torch alone.
"""

from qkvsearch.models.attention import MultiHeadAttention
from qkvsearch.models.capture import capture_attention, set_attention_path
from qkvsearch.models.config import ArchConfig, AttentionConfig, LayerConfig, StackConfig
from qkvsearch.models.counting import count_parameters, flops_per_token
from qkvsearch.models.feedforward import FEEDFORWARDS
from qkvsearch.models.heads import HEADS
from qkvsearch.models.masks import MASKS
from qkvsearch.models.norms import NORMS, PLACEMENTS
from qkvsearch.models.positions import POSITIONS
from qkvsearch.models.registry import ConfigError, Registry
from qkvsearch.models.scaling import SCALINGS
from qkvsearch.models.transformer import EncoderDecoderModel, StackModel, build_model

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
