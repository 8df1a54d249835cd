"""What a declarative space may hold: its keys, distribution types, budgets and errors.

Both the loader (``loading.py``) and the sampler (``space.py``) read this; neither imports
the other's private names.
"""

from __future__ import annotations

import dataclasses

import optuna

from qkvsearch.models.errors import QkvError
from qkvsearch.spaces.expressions import Expression


class SpaceError(QkvError):
    """A malformed space: names the source, the key and what is valid."""


class Infeasible(optuna.TrialPruned):
    """A sampled architecture that breaks a constraint or budget; nothing was built."""


PARAM_KEYS = {"type", "choices", "low", "high", "step", "log", "when", "per_layer"}
TYPES = ("categorical", "int", "float")
SPACE_KEYS = {"name", "description", "params", "derived", "constraints", "budget", "architecture"}
BUDGET_KEYS = ("max_params", "max_flops_per_token")
#: Names every constraint may read besides parameters and derived values.
MEASURED = ("n_params", "flops_per_token")


@dataclasses.dataclass(frozen=True)
class Param:
    """One sampled parameter: its distribution, condition and depth."""

    name: str
    distribution: optuna.distributions.BaseDistribution
    when: Expression | None = None
    per_layer: str | None = None  # the int parameter giving the number of layers

    def optuna_name(self, layer: int | None = None) -> str:
        return self.name if layer is None else f"{self.name}.layer{layer}"
