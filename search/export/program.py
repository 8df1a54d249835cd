"""``model.pt2``: a ``torch.export`` program, checked against the model."""

from __future__ import annotations

import pathlib

import torch

from qkvsearch.search.export import ExportError, ExportJob
from qkvsearch.search.export.check import difference, example_inputs


class TorchExport:
    name = "torch_export"

    def write(self, job: ExportJob, folder: pathlib.Path) -> list[str]:
        model, inputs = job.model.eval(), tuple(example_inputs(job.arch))
        path = folder / "model.pt2"
        torch.export.save(torch.export.export(model, inputs), str(path))
        with torch.no_grad():
            diff, close = difference(torch.export.load(str(path)).module()(*inputs), model(*inputs))
        if not close:
            raise ExportError(f"the torch.export program differs from the model by up to {diff:.3g}")
        return [f"model.pt2: torch.export program, outputs within {diff:.2g}"]
