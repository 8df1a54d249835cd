"""``model.onnx``, checked with onnxruntime against the model."""

from __future__ import annotations

import logging
import pathlib

import torch

from qkvsearch.search.export import ExportError, ExportJob
from qkvsearch.search.export.check import difference, example_inputs

#: onnxruntime's kernels round differently from torch's: they agree to this, not to float32 rounding
ONNX_ATOL = 1e-4


class Onnx:
    name = "onnx"

    def write(self, job: ExportJob, folder: pathlib.Path) -> list[str]:
        try:
            import onnxruntime
        except ImportError as error:
            raise ExportError(f"onnx=true needs onnx, onnxscript and onnxruntime (pip install 'qkvsearch[onnx]'): {error}") from None
        model, arch = job.model.eval(), job.arch
        inputs = example_inputs(arch)
        names = ["src", "tgt", "src_padding_mask", "tgt_padding_mask"] if arch.kind == "encoder_decoder" else ["tokens", "padding_mask"]
        path = folder / "model.onnx"
        for name in ("onnx_ir", "onnxscript", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        torch.onnx.export(model, tuple(inputs), str(path), input_names=names, output_names=["output"], dynamo=True, verbose=False)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
        got = torch.from_numpy(session.run(None, feed)[0])
        with torch.no_grad():
            diff, close = difference(got, model(*inputs), ONNX_ATOL)
        if not close:
            raise ExportError(f"ONNX outputs differ from the model by up to {diff:.3g}")
        return [f"model.onnx: checked with onnxruntime {onnxruntime.__version__}, outputs within {diff:.2g}"]
