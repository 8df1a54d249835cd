"""The standalone folder: ``model.py`` (torch only), ``model.safetensors``, ``config.yaml``,
a model card, and with a text task ``text.json`` and the tokenizer; loaded and compared
in a fresh process without qkvsearch before the export counts."""

from __future__ import annotations

import json
import pathlib

import yaml

from qkvsearch.search.base.weights import save_weights
from qkvsearch.search.export import ExportJob
from qkvsearch.search.export.card import architecture_table, metrics_table, provenance_lines
from qkvsearch.search.export.check import check_folder
from qkvsearch.search.export.codegen import generate_model_source
from qkvsearch.search.export.text import text_usage


class Standalone:
    """``model.py`` + safetensors + card: the folder a user copies into their code."""

    name = "standalone"

    def write(self, job: ExportJob, folder: pathlib.Path) -> list[str]:
        save_weights(job.model.state_dict(), folder / "model.safetensors", job.arch.fingerprint())
        if job.text is not None:
            job.text.tokenizer.save(folder)
            (folder / "text.json").write_text(json.dumps(job.text.spec, indent=1))
        (folder / "model.py").write_text(generate_model_source(job.arch, text=job.text is not None))
        (folder / "config.yaml").write_text(yaml.safe_dump(job.arch.to_dict(), sort_keys=False))
        check = check_folder(folder, job.model, job.arch, text=job.text)
        return [f"checked in a fresh process without qkvsearch: outputs within {check.get('max_abs_difference', 0):.2g}, "
                f"{check['n_params']:,} parameters"]

    def card(self, job: ExportJob, lines: list[str]) -> str:
        arch, source = job.arch, job.provenance
        return f"""# {source.study}, trial {source.trial}

A {arch.kind.replace('_', '-')} Transformer found by qkvsearch. `model.py` depends on torch alone:

```python
import model                  # with this folder on sys.path
net = model.load()            # builds the architecture, loads model.safetensors, eval mode
```
{text_usage(arch, job.text)}
{architecture_table(arch)}

## Metrics (from the study)

{metrics_table(source)}

## Provenance

{provenance_lines(arch, source, lines)}"""
