"""What a declarative space may hold: its keys, distribution types, budgets and errors.

Both the loader (``loading.py``) and the sampler (``space.py``) read this; neither imports
the other's private names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optuna

from qkvsearch.models.errors import QkvError
from qkvsearch.spaces.expressions import Expression


class SpaceError(QkvError):
    """A malformed space: names the source, the key and what is valid."""


class Infeasible(optuna.TrialPruned):
    """A sampled architecture that breaks a constraint or budget; nothing was built."""


PARAM_KEYS = {"type", "choices", "low", "high", "step", "log", "when", "per_layer"}
TYPES = ("categorical", "int", "float")
SPACE_KEYS = {"name", "description", "params", "derived", "constraints", "budget", "architecture", "optim", "reference"}
BUDGET_KEYS = ("max_params", "max_flops_per_token")
#: What a space's ``optim`` template may set: the optimiser settings a trial trains with
#: (``LitTransformer``'s), each with the test its value must pass and what that means.
OPTIM_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "warmup_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "min_lr_ratio": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
}
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


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
