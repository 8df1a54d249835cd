"""Proxy trust: how well an early validation loss, or a zero-cost proxy, ranks the final one.

Every pruning decision bets that a trial's loss at an early validation ranks it as its final
loss would. Over the study's trials that ran to the end, this measures that bet at each
validation step (Spearman's rho and Kendall's tau between the value there and the final
value), and the same for parameter count and FLOPs per token, which cost nothing to compute.
Only survivors are measured (a pruned trial has no final loss), so the figures describe the
trials that were good enough to finish. Single-objective studies only.
"""

from __future__ import annotations

import dataclasses
import math

import optuna

from qkvsearch.search.base.keys import DUPLICATE_OF, FLOPS_PER_TOKEN, N_PARAMS, PRUNED_BY, PRUNED_REASON
from qkvsearch.search.inspect.selection import ranked

#: below this Spearman rho at the first rung, pruning there is close to a coin toss
WEAK = 0.5
#: the fewest finished trials a correlation is computed over
MIN_TRIALS = 4


@dataclasses.dataclass
class Agreement:
    """The rank agreement of one predictor with the final value."""

    predictor: str  # "step 100" or a proxy's name
    step: int | None
    n: int
    spearman: float
    kendall: float


def _agreement(predictor: str, step: int | None, xs: list[float], ys: list[float]) -> Agreement:
    if len(xs) < MIN_TRIALS or len(set(xs)) < 2 or len(set(ys)) < 2:
        return Agreement(predictor, step, len(xs), math.nan, math.nan)
    # imported here, not at the top: 1.5 CPU-s that a worker which never ranks need not pay
    from scipy import stats

    return Agreement(predictor, step, len(xs), float(stats.spearmanr(xs, ys).statistic),
                     float(stats.kendalltau(xs, ys).statistic))


def proxy_trust(study: optuna.Study) -> list[Agreement]:
    """One row per validation step (in order), then parameter count and FLOPs per token;
    empty for a study with several objectives."""
    if len(study.directions) > 1:
        return []
    finished = [t for t in ranked(study) if DUPLICATE_OF not in t.user_attrs]
    rows = []
    steps = sorted({step for t in finished for step in t.intermediate_values})
    for step in steps:
        having = [t for t in finished if step in t.intermediate_values]
        rows.append(_agreement(f"step {step}", step, [t.intermediate_values[step] for t in having],
                               [t.values[0] for t in having]))
    for proxy in (N_PARAMS, FLOPS_PER_TOKEN):
        having = [t for t in finished if proxy in t.user_attrs]
        rows.append(_agreement(proxy, None, [float(t.user_attrs[proxy]) for t in having], [t.values[0] for t in having]))
    return rows


def first_rung(study: optuna.Study) -> int | None:
    """The earliest step at which the pruner stopped a trial (None: it stopped none)."""
    steps = [max(t.intermediate_values) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
             if t.intermediate_values and str(t.user_attrs.get(PRUNED_REASON, "")).startswith(PRUNED_BY)]
    return min(steps, default=None)


def trust_warning(rows: list[Agreement], rung: int | None = None) -> str:
    """A warning when the step where pruning starts (``rung``: the pruner's first decision
    seen, else the first validation) ranks the final values poorly, else ''."""
    measured = [r for r in rows if r.step is not None and not math.isnan(r.spearman)]
    first = next((r for r in measured if r.step == rung), None) if rung is not None else None
    first = first or (measured[0] if measured and rung is None else None)
    if first is None or first.spearman >= WEAK:
        return ""
    return (f"the loss at {first.predictor} ranks the final loss poorly (Spearman rho {first.spearman:.2f} over "
            f"{first.n} finished trials): pruning there is close to a coin toss; start pruning later "
            "(pruner.min_resource for hyperband and sha, pruner.n_warmup_steps for median)")
