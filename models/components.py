"""Every component registry, by the config field that chooses from it."""

from __future__ import annotations

from qkvsearch.models.feedforward import FEEDFORWARDS
from qkvsearch.models.heads import HEADS
from qkvsearch.models.masks import MASKS
from qkvsearch.models.norms import NORMS, PLACEMENTS
from qkvsearch.models.positions import POSITIONS
from qkvsearch.models.registry import Registry
from qkvsearch.models.scaling import SCALINGS

REGISTRIES: dict[str, Registry] = {
    "scaling": SCALINGS,
    "masks": MASKS,
    "positions": POSITIONS,
    "ffn": FEEDFORWARDS,
    "norm": NORMS,
    "norm_placement": PLACEMENTS,
    "head": HEADS,
}
