"""What the terminal shows: the sweep's progress line and the table of best trials."""

from __future__ import annotations

import optuna
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qkvsearch.models.describe import layer_rows
from qkvsearch.search.base.keys import DUPLICATE_OF, N_PARAMS, TEST_SCORES
from qkvsearch.search.inspect.finalists import finalists, margin, verdict
from qkvsearch.search.inspect.selection import architecture, counted, objective_names, top_trials
from qkvsearch.search.inspect.trust import first_rung, proxy_trust, trust_warning

State = optuna.trial.TrialState


def progress_line(study: optuna.Study, n_trials: int) -> Text:
    """``trials 5/12 | complete 3 | pruned 1 | failed 1 | retried 1 | running 1 | best 1.234``:
    what counts towards ``n_trials``; lost trials that were queued again show as retried."""
    trials = study.get_trials(deepcopy=False)
    kept = counted(trials)
    by_state = {s: sum(t.state == s for t in kept) for s in (State.COMPLETE, State.PRUNED, State.FAIL, State.RUNNING)}
    finished = by_state[State.COMPLETE] + by_state[State.PRUNED] + by_state[State.FAIL]
    width = 24
    filled = int(width * min(finished, n_trials) / n_trials)
    return Text.assemble(
        ("[" + "#" * filled + "-" * (width - filled) + "] ", "cyan"),
        f"trials {finished}/{n_trials} | complete {by_state[State.COMPLETE]} | pruned {by_state[State.PRUNED]} | ",
        (f"failed {by_state[State.FAIL]}", "red" if by_state[State.FAIL] else ""),
        f" | retried {len(trials) - len(kept)} | running {by_state[State.RUNNING]} | best {best_text(study)}",
    )


def best_text(study: optuna.Study) -> str:
    complete = study.get_trials(deepcopy=False, states=(State.COMPLETE,))
    if not complete:
        return "-"
    if len(study.directions) > 1:
        return f"{len(study.best_trials)} on the Pareto front"
    best = top_trials(study, k=1)[0]
    return f"{best.value:.4f} (trial {best.number})"


def _architecture(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """A compact description of the trial's architecture (from :func:`layer_rows`), runs
    of identical layers written once with their count."""
    arch = architecture(study, trial)
    parts = [f"d_model {arch.d_model}, {arch.positions.name}"]
    runs: list[tuple[str, str, int]] = []
    for row in layer_rows(arch):
        stack = row["layer"].split()[0]
        text = (f"{row['heads']}h/{row['kv heads']}kv d_k {row['d_k']} {row['scaling']} {row['masks']} "
                f"{row['ffn']} {row['d_ff']}")
        if runs and runs[-1][:2] == (stack, text):
            runs[-1] = (stack, text, runs[-1][2] + 1)
        else:
            runs.append((stack, text, 1))
    parts += [f"{stack} x{count}: {text}" for stack, text, count in runs]
    return "; ".join(parts)


def print_summary(study: optuna.Study, overrides: list[str], console: Console | None = None) -> None:
    """Prints the best trials with their architectures, then the commands (with
    ``overrides``) that open the dashboard and export the best."""
    console = console or Console()
    objectives = objective_names(study)
    table = Table(title=f"study {study.study_name}: " + ("Pareto front" if len(objectives) > 1 else "best trials"))
    table.add_column("trial", justify="right")
    for name in objectives:
        table.add_column(name, justify="right")
    tests = study.user_attrs.get(TEST_SCORES) or {}  # held out: never trained or selected on
    show_acc = any(s.get("test_acc", 0) > 0 for s in tests.values())
    if tests:
        table.add_column("test_loss", justify="right")
        if show_acc:
            table.add_column("test_acc", justify="right")
    table.add_column("params", justify="right")
    table.add_column("architecture")
    for trial in top_trials(study):
        values = [f"{v:.4g}" for v in trial.values]
        if tests:
            test = tests.get(str(trial.number), {})
            values.append(f"{test['test_loss']:.4g}" if "test_loss" in test else "")
            if show_acc:
                values.append(f"{test['test_acc']:.4g}" if "test_acc" in test else "")
        note = f" (same as {trial.user_attrs[DUPLICATE_OF]})" if DUPLICATE_OF in trial.user_attrs else ""
        table.add_row(str(trial.number), *values, f"{trial.user_attrs.get(N_PARAMS, 0):,}", _architecture(study, trial) + note)
    console.print()
    console.print(table)
    print_finalists(study, console)
    if ahead := margin(study):
        console.print(ahead["line"])
    print_trust(study, console)
    args = " ".join(overrides)
    for name in ("dashboard", "report", "export"):  # one line each, however narrow the terminal: they are pasted
        console.print(f"{name + ':':<11}qkv {name} {args}", soft_wrap=True, highlight=False)


def _number(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # NaN: too few trials, or a constant


def print_finalists(study: optuna.Study, console: Console) -> None:
    """The finalists, ranked by their mean over seeds, and whether the top two differ."""
    table_rows = finalists(study)
    if not table_rows:
        return
    name = objective_names(study)[0]
    table = Table(title=f"finalists: {name} over seeds (the search trial and its retrainings)")
    for column in ("trial", "seeds", f"mean {name}", "std", "values", "params"):
        table.add_column(column, justify="right" if column != "values" else "left")
    for row in table_rows:
        table.add_row(str(row.trial.number), str(len(row.values)), f"{row.mean:.4f}", _number(row.std, 4),
                      ", ".join(f"{v:.4f}" for v in row.values), f"{row.trial.user_attrs.get(N_PARAMS, 0):,}")
    console.print(table)
    if line := verdict(table_rows):
        console.print(line)


def print_trust(study: optuna.Study, console: Console) -> None:
    """How well each validation step and each zero-cost proxy ranks the final values."""
    rows = proxy_trust(study)
    if not any(r.n for r in rows):
        return
    table = Table(title="proxy trust: rank agreement with the final value, over trials that finished")
    for column in ("predictor", "trials", "spearman", "kendall"):
        table.add_column(column, justify="left" if column == "predictor" else "right")
    for row in rows:
        table.add_row(row.predictor, str(row.n), _number(row.spearman), _number(row.kendall))
    console.print(table)
    if warning := trust_warning(rows, first_rung(study)):
        console.print(f"[yellow]warning:[/yellow] {warning}")
