"""How an export checks its own work: the same inputs through the searched model and through
what the folder holds, compared within one tolerance rule; the standalone folder is loaded
in a fresh Python process where qkvsearch cannot be imported."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import torch
from safetensors.torch import save_file

from qkvsearch.models import ArchConfig, count_parameters
from qkvsearch.search.export import ExportError

#: float32 outputs of two implementations of one function agree to this, relative to their scale
ATOL = 1e-5

CHECK_SCRIPT = r"""
import importlib.abc, json, sys
BLOCKED = {"models", "spaces", "search", "tasks", "conf", "qkvsearch"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the export must run without qkvsearch")
        return None
sys.meta_path.insert(0, Block())
folder, inputs_path, text = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, folder)
import torch
import model
net = model.load(folder)
inputs = model.read_safetensors(inputs_path)
args = [inputs[k] for k in sorted(inputs, key=lambda k: int(k.split("_")[0]))]
with torch.no_grad():
    out = net(*args)
written = {}
if "prompt" in text:
    written["generated"] = model.generate(text["prompt"], text["max_new_tokens"], temperature=0)
if "texts" in text:
    written["predicted"] = model.predict(text["texts"])
print(json.dumps({"output": out.double().flatten().tolist(), "shape": list(out.shape),
                  "n_params": sum(p.numel() for p in net.parameters()), "text": written,
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def difference(got: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> tuple[float, bool]:
    """The largest absolute difference, and whether it is within ``atol`` times the outputs' scale."""
    diff = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    return diff, diff <= atol * (1 + scale)


def example_inputs(arch: ArchConfig, seed: int = 0) -> list[torch.Tensor]:
    """Random forward arguments, the second sequence padded at the end."""
    generator = torch.Generator().manual_seed(seed)
    seq = min(arch.max_seq_len, 24)
    tokens = torch.randint(0, arch.vocab_size, (2, seq), generator=generator)
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[1, seq - max(1, seq // 3) :] = False
    if arch.kind == "encoder_decoder":
        tgt = torch.randint(0, arch.vocab_size, (2, seq), generator=generator)
        return [tokens, tgt, mask, mask.clone()]
    return [tokens, mask]


def check_folder(folder: pathlib.Path, model: torch.nn.Module, arch: ArchConfig, text: Any = None,
                 atol: float = ATOL) -> dict[str, Any]:
    """Loads the folder in a fresh process without qkvsearch and compares it with ``model``
    (and, with ``text``, the text it generates or the labels it predicts).

    Raises:
        ExportError: naming the difference (outputs, shapes, parameter count, imports).
    """
    inputs = example_inputs(arch)
    with tempfile.TemporaryDirectory() as scratch:
        inputs_path = pathlib.Path(scratch) / "inputs.safetensors"
        save_file({f"{i}_arg": t.contiguous() for i, t in enumerate(inputs)}, str(inputs_path))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        result = subprocess.run(
            [sys.executable, "-I", "-B", "-c", CHECK_SCRIPT, str(folder.resolve()), str(inputs_path),
             json.dumps(text.check if text else {})],
            capture_output=True, text=True, cwd=scratch, env=env, timeout=600,
        )
    if result.returncode:
        raise ExportError(f"the exported folder failed to load in a fresh process:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = model.eval()(*inputs).double()
    problems = []
    if report["modules"]:
        problems.append(f"qkvsearch modules were imported: {report['modules']}")
    if report["n_params"] != count_parameters(arch):
        problems.append(f"parameter count {report['n_params']:,} differs from the architecture's {count_parameters(arch):,}")
    if report["shape"] != list(expected.shape):
        problems.append(f"output shape {report['shape']} differs from {list(expected.shape)}")
    else:
        got = torch.tensor(report["output"], dtype=torch.float64).reshape(expected.shape)
        report["max_abs_difference"], close = difference(got, expected, atol)
        if not close:
            problems.append(f"outputs differ by up to {report['max_abs_difference']:.3g} (tolerance {atol:g})")
    for name, value in (text.expected if text else {}).items():
        if report["text"].get(name) != value:
            problems.append(f"{name} {report['text'].get(name)!r} differs from the model's {value!r}")
    if problems:
        raise ExportError("the exported model does not match: " + "; ".join(problems))
    return report
