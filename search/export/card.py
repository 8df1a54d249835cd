"""The model card's parts every folder shares: the architecture's table, the study's
metrics (with the finalists' spread, the held-out test scores and the baseline margin)
and where the model came from."""

from __future__ import annotations

import datetime

from qkvsearch.models import ArchConfig, count_parameters, flops_per_token
from qkvsearch.models.describe import COLUMNS, layer_rows
from qkvsearch.search.base.version import versions
from qkvsearch.search.export import Provenance


def architecture_table(arch: ArchConfig) -> str:
    """The architecture's sizes, then one row per layer, as Markdown."""
    rows = "\n".join("| " + " | ".join(str(v) for v in row.values()) + " |" for row in layer_rows(arch))
    return f"""| | |
| --- | --- |
| parameters | {count_parameters(arch):,} |
| forward FLOPs per token | {flops_per_token(arch):,} |
| d_model | {arch.d_model} |
| vocabulary | {arch.vocab_size} |
| max sequence length | {arch.max_seq_len} |
| positions | {arch.positions.name} |
| norm | {arch.norm_placement.name}-{arch.norm.name} |
| head | {arch.head.name}{' (tied to the embedding)' if arch.tie_embeddings else ''} |

## Layers

| {" | ".join(COLUMNS)} |
|{" --- |" * len(COLUMNS)}
{rows}"""


def metrics_table(source: Provenance) -> str:
    """The trial's objective values, test scores, finalist spread and baseline margin, as Markdown."""
    rows = [f"| {name} | {value:.6g} |" for name, value in zip(source.objectives, source.values, strict=False)]
    rows += [f"| {name} (held-out test split, not selected on) | {source.test[name]:.6g} |"
             for name in ("test_loss", "test_acc") if name in source.test]
    if source.finalist is not None:
        mean, std, seeds = source.finalist
        rows.append(f"| {source.objectives[0]}, mean over {seeds} seeds (finalist) | {mean:.6g} ± {std:.2g} |")
    if source.baseline:
        rows.append(f"| {source.objectives[0]} of the space's reference model (baseline) | {source.baseline['value']:.6g} |")
        rows.append(f"| margin over the baseline | {source.baseline['margin']:+.6g} |")
    return "| objective | value |\n| --- | --- |\n" + "\n".join(rows)


def provenance_lines(arch: ArchConfig, source: Provenance, lines: list[str]) -> str:
    """Where the model came from and how the export was checked, as a Markdown list."""
    same = f" (same candidate as trial {source.duplicate_of})" if source.duplicate_of is not None else ""
    v = versions()
    items = [
        f"study: `{source.study}`, trial {source.trial}{same}",
        f"task: {source.task}, space: {source.space}; trained with qkvsearch {source.code_version}",
        f"weights: {source.weights}",
        f"architecture hash: {arch.fingerprint()}",
        f"exported {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} with qkvsearch "
        f"{v['qkvsearch']}, torch {v['torch']}, Python {v['python']}",
        *lines,
    ]
    return "".join(f"- {item}\n" for item in items)
