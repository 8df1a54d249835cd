"""``qkv report``: one self-contained HTML file about a study (plotly.js inlined, opens offline).

Sections: the best trials, the finalists (each retrained with more seeds), proxy trust
(how well each validation step and zero-cost proxy ranks the final values), optimisation history, Pareto front (several objectives), parameter importances,
parallel coordinates, intermediate values, the best trials with their architectures, a
per-layer picture of the best architecture, and its attention weights per layer and head
on a sample input of its task. A section that cannot be drawn yet (no complete trial,
too few for importances) says why; the rest still renders.
"""

from __future__ import annotations

import html
import pathlib
from collections.abc import Callable
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.offline
from omegaconf import DictConfig

from qkvsearch.models import ArchConfig, count_parameters
from qkvsearch.models.describe import COLUMNS, layer_rows
from qkvsearch.search.base.keys import EXPORTS, N_PARAMS, TASK, TEST_SCORES, reason
from qkvsearch.search.base.weights import load_trained
from qkvsearch.search.inspect.artifacts import AttentionMap, attention_maps, trial_weights
from qkvsearch.search.inspect.finalists import baseline, finalists, margin, verdict
from qkvsearch.search.inspect.selection import architecture, objective_names, top_trials
from qkvsearch.search.inspect.trust import first_rung, proxy_trust, trust_warning
from qkvsearch.search.study.prepare import task_of_study
from qkvsearch.search.study.storage import load_named_study

State = optuna.trial.TrialState


def _section(title: str, body: str) -> str:
    return f'<section><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _figure(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _plot(make: Callable[[], go.Figure]) -> str:
    """A figure, or the reason it cannot be drawn."""
    try:
        return _figure(make())
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        return _note(f"not drawn: {error}")


#: past this many finished trials, the plots of every trial draw the latest ones and the
#: :data:`PLOT_BEST` best (a 10,000-trial study's would be megabytes of curves, and its
#: importances a forest fitted on all of them); the optimisation history keeps every trial
PLOT_LIMIT = 1000
PLOT_BEST = 25


def plotted(study: optuna.Study) -> tuple[list[optuna.trial.FrozenTrial], str]:
    """The finished trials the per-trial plots draw (in order), and a note saying which
    when they are not all of them."""
    finished = study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED))
    if len(finished) <= PLOT_LIMIT:
        return finished, ""
    chosen = {t.number: t for t in finished[-PLOT_LIMIT:]}
    chosen.update((t.number, t) for t in top_trials(study, k=PLOT_BEST))
    note = _note(f"drawn from the latest {PLOT_LIMIT:,} of {len(finished):,} finished trials and the "
                 f"{PLOT_BEST} best, so that a large study's report stays small")
    return [chosen[number] for number in sorted(chosen)], note


def history_sections(study: optuna.Study) -> list[str]:
    """Optuna's own plots of the study (those of every trial over :func:`plotted`'s)."""
    vis = optuna.visualization
    names = objective_names(study)
    multi = len(names) > 1
    first = {"target": lambda t: t.values[0], "target_name": names[0]} if multi else {"target_name": names[0]}
    out = [_section("Optimisation history", _plot(lambda: vis.plot_optimization_history(study, **first)))]
    if multi:
        out.append(_section("Pareto front", _plot(lambda: vis.plot_pareto_front(study, target_names=names))))
    trials, note = plotted(study)
    view = study
    if note:  # Optuna's plots take a study: one in memory holding the plotted trials
        view = optuna.create_study(directions=study.directions)
        view.add_trials(trials)
    n_complete = len(view.get_trials(deepcopy=False, states=(State.COMPLETE,)))
    caveat = _note(f"computed from only {n_complete} complete trials: a rough hint, not a ranking") if n_complete < 10 else ""
    out.append(_section(f"Parameter importances for {names[0]}",
                        note + caveat + _plot(lambda: vis.plot_param_importances(view, **first))))
    out.append(_section("Parallel coordinates", note + _plot(lambda: vis.plot_parallel_coordinate(view, **first))))
    if not multi:
        out.append(_section("Intermediate values (complete and pruned trials)",
                            note + _plot(lambda: intermediate_figure(trials, names[0]))))
    return out


def speed_cells(attrs: dict[str, Any]) -> str:
    """How fast a trial trained: tokens/s, model FLOP utilisation and peak device memory
    (a dash where the trial has no such figure: a CPU has no known peak)."""
    tokens = attrs.get("train_tokens_per_s")
    mfu, peak = attrs.get("mfu"), attrs.get("peak_memory_mb")
    cells = [f"{tokens:,.0f}" if tokens is not None else "-", f"{100 * mfu:.1f}%" if mfu is not None else "-",
             f"{peak:,.0f} MB" if peak is not None else "-"]
    return "".join(f"<td>{c}</td>" for c in cells)


def trials_table(study: optuna.Study) -> str:
    """The best trials (or the Pareto front) with their architectures; failures with reasons."""
    names = objective_names(study)
    speed = ["tokens/s", "MFU", "peak memory"]
    tests = study.user_attrs.get(TEST_SCORES) or {}  # the held-out split, for the best trials
    held_out = ["test_loss", "test_acc"] if tests else []
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["trial", *names, *held_out, "parameters", *speed, "architecture"])
    rows = []
    for trial in top_trials(study, k=10):
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        test = tests.get(str(trial.number), {})
        values = "".join(f"<td>{v:.4g}</td>" for v in trial.values) + "".join(
            f"<td>{test[n]:.4g}</td>" if n in test else "<td>-</td>" for n in held_out)
        rows.append(f"<tr><td>{trial.number}</td>{values}<td>{trial.user_attrs.get(N_PARAMS, 0):,}</td>"
                    f"{speed_cells(trial.user_attrs)}<td>{html.escape(params)}</td></tr>")
    table = f"<table><tr>{head}</tr>{''.join(rows)}</table>" if rows else _note("no complete trial yet")
    others = [t for t in study.get_trials(deepcopy=False) if t.state in (State.FAIL, State.PRUNED)]
    if others:
        items = "".join(
            f"<li>trial {t.number} {t.state.name.lower()}: {html.escape(reason(t))}</li>"
            for t in others[:50]
        )
        table += f"<details><summary>{len(others)} pruned or failed trials</summary><ul>{items}</ul></details>"
    return _section("Best trials" if len(names) == 1 else "Pareto-optimal trials", table)


def finalists_section(study: optuna.Study) -> str:
    """The finalists ranked by their mean over seeds, and whether the top two are within noise."""
    rows = finalists(study)
    if not rows:
        return ""
    name = objective_names(study)[0]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["trial", "seeds", f"mean {name}", "std", "values", "parameters"])
    body = "".join(
        f"<tr><td>{r.trial.number}</td><td>{len(r.values)}</td><td>{r.mean:.4f}</td><td>{r.std:.4f}</td>"
        f"<td>{', '.join(f'{v:.4f}' for v in r.values)}</td><td>{r.trial.user_attrs.get(N_PARAMS, 0):,}</td></tr>"
        for r in rows)
    return _section("Finalists: each retrained with more seeds", f"<table><tr>{head}</tr>{body}</table>" + _note(verdict(rows)))


def baseline_section(study: optuna.Study) -> str:
    """The space's reference configuration against the winner, over their seeds."""
    ahead = margin(study)
    if ahead is None:
        return ""
    base = baseline(study)
    params = " ".join(f"{k}={v}" for k, v in base.trial.params.items())
    return _section("Baseline: the space's reference configuration", _note(ahead["line"])
                    + f"<p>reference: {html.escape(params)} ({base.trial.user_attrs.get(N_PARAMS, 0):,} parameters); "
                    f"values over seeds: {', '.join(f'{v:.4f}' for v in base.values)}</p>")


def exports_section(study: optuna.Study) -> str:
    """The folders ``qkv export`` wrote from this study, linked where they still exist."""
    records = study.user_attrs.get(EXPORTS) or []
    if not records:
        return ""
    items = []
    for record in records:
        folder = pathlib.Path(record["folder"])
        where = (f'<a href="{html.escape(folder.as_uri())}">{html.escape(str(folder))}</a>' if folder.exists()
                 else f"{html.escape(str(folder))} (no longer there)")
        items.append(f"<li>trial {record['trial']}, {html.escape(record['format'])}: {where}, {html.escape(record['exported'])}</li>")
    return _section("Exports", f"<ul>{''.join(items)}</ul>")


def trust_section(study: optuna.Study) -> str:
    """Rank agreement of each validation step and each zero-cost proxy with the final value."""
    rows = proxy_trust(study)
    if not any(r.n for r in rows):
        return ""
    head = "".join(f"<th>{n}</th>" for n in ("predictor", "finished trials", "Spearman rho", "Kendall tau"))

    def cell(x: float) -> str:
        return "-" if x != x else f"{x:.2f}"

    body = "".join(f"<tr><td>{html.escape(r.predictor)}</td><td>{r.n}</td><td>{cell(r.spearman)}</td>"
                   f"<td>{cell(r.kendall)}</td></tr>" for r in rows)
    warning = trust_warning(rows, first_rung(study))
    text = ("How well the value at each validation step (what a pruner decides on) and each zero-cost proxy rank "
            "the final values, over the trials that ran to the end.")
    return _section("Proxy trust", _note(text) + f"<table><tr>{head}</tr>{body}</table>"
                    + (f'<p class="warning">warning: {html.escape(warning)}</p>' if warning else ""))


def layer_table(arch: ArchConfig, runner_up: ArchConfig | None = None) -> str:
    """The architecture per layer as a table; cells that differ from the runner-up's are
    marked (a layer the runner-up lacks is marked whole)."""
    theirs = layer_rows(runner_up) if runner_up is not None else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for i, row in enumerate(layer_rows(arch)):
        other = theirs[i] if i < len(theirs) else None
        cells = []
        for key, value in row.items():
            differs = runner_up is not None and (other is None or other[key] != value) and key != "layer"
            title = f' title="runner-up: {html.escape(str(other[key]))}"' if differs and other is not None else ""
            cells.append(f'<td class="{"differs" if differs else ""}"{title}>{html.escape(str(value))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    caption = (f"d_model {arch.d_model}, positions {arch.positions.name}, {arch.norm_placement.name}-{arch.norm.name}, "
               f"{count_parameters(arch):,} parameters")
    note = _note("highlighted: differs from the runner-up (hover for its value)") if runner_up is not None else ""
    return f"<p>{html.escape(caption)}</p><table><tr>{head}</tr>{''.join(body)}</table>{note}"


def attention_figure(maps: list[AttentionMap]) -> go.Figure:
    """One square heatmap of attention weights, tokens on both axes, hover values, and a
    selector over layers and heads."""
    fig = go.Figure()
    buttons = []
    panels = [(m, h) for m in maps for h in range(m.weights.shape[0])]
    for i, (m, h) in enumerate(panels):
        text = [[f"{q!r} -> {k!r}" for k in m.keys] for q in m.queries]
        fig.add_trace(go.Heatmap(z=m.weights[h].numpy(), text=text, visible=i == 0, coloraxis="coloraxis",
                                 hovertemplate="query %{y}, key %{x}: %{text}<br>weight %{z:.3f}<extra></extra>"))
        axes = {"xaxis.tickvals": list(range(len(m.keys))), "xaxis.ticktext": m.keys,
                "yaxis.tickvals": list(range(len(m.queries))), "yaxis.ticktext": m.queries}
        buttons.append({"label": f"{m.name}, head {h}", "method": "update",
                        "args": [{"visible": [j == i for j in range(len(panels))]}, axes]})
    first = buttons[0]["args"][1]
    size = max(320, min(720, 18 * max(len(maps[0].keys), len(maps[0].queries)) + 160))
    fig.update_layout(
        updatemenus=[{"buttons": buttons, "x": 0, "xanchor": "left", "y": 1.15, "yanchor": "top"}],
        coloraxis={"colorscale": "Viridis", "cmin": 0}, width=size + 120, height=size + 60,
        xaxis={"title": "key", "tickvals": first["xaxis.tickvals"], "ticktext": first["xaxis.ticktext"], "tickfont": {"family": "monospace"}},
        yaxis={"title": "query", "tickvals": first["yaxis.tickvals"], "ticktext": first["yaxis.ticktext"], "autorange": "reversed",
               "scaleanchor": "x", "tickfont": {"family": "monospace"}},
        margin={"t": 80},
    )
    return fig


def intermediate_figure(trials: list[optuna.trial.FrozenTrial], objective: str) -> go.Figure:
    """Each finished trial's validated objective by step; pruned trials dotted and named so."""
    fig = go.Figure()
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        pruned = t.state == State.PRUNED
        fig.add_trace(go.Scatter(x=steps, y=[t.intermediate_values[k] for k in steps], mode="lines+markers",
                                 name=f"trial {t.number}" + (" (pruned)" if pruned else ""), opacity=0.55 if pruned else 1.0,
                                 line={"dash": "dot" if pruned else "solid"}))
    fig.update_layout(xaxis_title="step", yaxis_title=objective, legend_title_text="trials (dotted: pruned)", height=420)
    return fig


def best_model_sections(study: optuna.Study, task_loader: Callable[[], Any] | None, run_root: str) -> list[str]:
    """The best architecture per layer, and its attention on a sample input."""
    best = top_trials(study, k=2)
    if not best:
        return [_section("Best architecture", _note("no complete trial yet"))]
    trial = best[0]
    arch = architecture(study, trial)
    runner_up = architecture(study, best[1]) if len(best) > 1 and len(study.directions) == 1 else None
    out = [_section(f"Best architecture (trial {trial.number})", layer_table(arch, runner_up))]
    weights = trial_weights(study, trial, run_root)
    task_name = study.user_attrs.get(TASK)
    if not weights.is_file() or task_loader is None or task_name is None:
        out.append(_section("Attention weights", _note(f"not drawn: no weights at {weights} or no task recorded")))
        return out
    task = task_loader()
    maps = attention_maps(load_trained(arch, weights), task)
    out.append(_section(f"Attention weights of trial {trial.number} on the first validation example of {task_name}",
                        _figure(attention_figure(maps))))
    return out


STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}.note{color:#777}
td.differs{background:#fff3b0;font-weight:600}.warning{color:#a15c00;font-weight:600}"""


def render(study: optuna.Study, task_loader: Callable[[], Any] | None = None, run_root: str = "runs") -> str:
    """The whole report as one HTML string."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in (State.COMPLETE, State.PRUNED, State.FAIL, State.RUNNING)}
    summary = (f"{len(trials)} trials: {counts[State.COMPLETE]} complete, {counts[State.PRUNED]} pruned, "
               f"{counts[State.FAIL]} failed, {counts[State.RUNNING]} running. Objectives: "
               + ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(objective_names(study), study.directions, strict=True))
               + f". Task {study.user_attrs.get('task', '?')}, space {study.user_attrs.get('space', '?')}.")
    sections = [trials_table(study), finalists_section(study), baseline_section(study), exports_section(study),
                trust_section(study)]
    if counts[State.COMPLETE]:
        sections += history_sections(study) + best_model_sections(study, task_loader, run_root)
    elif trials:
        sections.append(_note("no trial has completed: plots appear once one has"))
    else:
        sections.append(_note("the study has no trials yet"))
    script = f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>'
    title = html.escape(f"qkvsearch study {study.study_name}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>{script}</head>"
            f"<body><h1>{title}</h1><p>{html.escape(summary)}</p>{''.join(sections)}</body></html>")


def report(cfg: DictConfig, study: optuna.Study | None = None) -> pathlib.Path:
    """Writes the report of ``cfg.study_name`` (default: the latest study) and returns its path.
    ``study``: that study, when the caller has loaded it already."""
    study = study if study is not None else load_named_study(cfg.storage, cfg.study_name)
    name = study.study_name

    def task_loader() -> Any:
        return task_of_study(study)

    out = pathlib.Path(cfg.out or pathlib.Path(cfg.run_root) / f"{name}-report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(study, task_loader, cfg.run_root), encoding="utf-8")
    return out
