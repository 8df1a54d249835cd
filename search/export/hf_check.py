"""How a Hugging Face folder checks its own work: a fresh Python process where qkvsearch
cannot be imported loads it with ``transformers`` (``trust_remote_code`` on the remote-code
path), and its logits on a padded batch, its greedy ``generate``, its tokenizer, a
``save_pretrained`` round trip and a training step must agree with the searched model."""

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

from qkvsearch.models import ArchConfig
from qkvsearch.search.export import ExportError
from qkvsearch.search.export.check import difference, example_inputs

CHECK_SCRIPT = r"""
import importlib.abc, json, sys, tempfile
BLOCKED = {"models", "spaces", "search", "tasks", "conf", "qkvsearch"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the export must load without qkvsearch")
        return None
sys.meta_path.insert(0, Block())
import torch, transformers
from safetensors.torch import load_file
folder, inputs_path, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
inputs = load_file(inputs_path)
auto = getattr(transformers, spec["auto"])
model = auto.from_pretrained(folder, trust_remote_code=spec["remote"]).eval()
def outputs(net):
    with torch.no_grad():
        if "decoder_input_ids" in inputs:
            return net(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       decoder_input_ids=inputs["decoder_input_ids"], decoder_attention_mask=inputs["decoder_attention_mask"]).logits
        return net(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
logits = outputs(model)
report = {"logits": logits.double().flatten().tolist(), "shape": list(logits.shape), "class": type(model).__name__}
if spec.get("prompt"):
    prompt = torch.tensor([spec["prompt"]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=spec["new_tokens"],
                               do_sample=False, pad_token_id=0)
    report["generated"] = generated[0, prompt.shape[1]:].tolist()
if spec.get("text") is not None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(spec["text"], add_special_tokens=False)["input_ids"]
    report["token_ids"], report["decoded"] = ids, tokenizer.decode(ids)
with tempfile.TemporaryDirectory() as again:
    model.save_pretrained(again)
    reloaded = auto.from_pretrained(again, trust_remote_code=spec["remote"]).eval()
    report["reloaded_difference"] = float((outputs(reloaded) - logits).abs().max())
model.train()
before = [p.detach().clone() for p in model.parameters()]
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
if spec["auto"] == "AutoModelForCausalLM":
    loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["input_ids"]).loss
elif spec["auto"] == "AutoModelForSequenceClassification":
    loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 labels=torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)).loss
else:  # a model without a loss of its own: any differentiable function of its outputs
    loss = model(**inputs).logits.float().square().mean()
loss.backward()
optimizer.step()
report["train_loss"] = float(loss.detach())
report["trained"] = any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
report["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("QKV-REPORT " + json.dumps(report))
"""


def hf_inputs(arch: ArchConfig) -> dict[str, torch.Tensor]:
    """The check's batch under Hugging Face's names: two sequences, the second padded at the end."""
    args = example_inputs(arch)
    if arch.kind == "encoder_decoder":
        return {"input_ids": args[0], "decoder_input_ids": args[1], "attention_mask": args[2].long(),
                "decoder_attention_mask": args[3].long()}
    return {"input_ids": args[0], "attention_mask": args[1].long()}


def run_check(folder: pathlib.Path, inputs: dict[str, torch.Tensor], spec: dict[str, Any]) -> dict[str, Any]:
    """Runs the check script on ``folder``; returns its report.

    Raises:
        ExportError: the folder did not load or a step of the check failed, with its message.
    """
    with tempfile.TemporaryDirectory() as scratch:
        path = pathlib.Path(scratch) / "inputs.safetensors"
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(path))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   TRANSFORMERS_VERBOSITY="error", HF_MODULES_CACHE=str(pathlib.Path(scratch) / "modules"))
        result = subprocess.run([sys.executable, "-I", "-B", "-c", CHECK_SCRIPT, str(folder.resolve()), str(path),
                                 json.dumps(spec)], capture_output=True, text=True, cwd=scratch, env=env, timeout=900)
    if result.returncode or "QKV-REPORT " not in result.stdout:
        raise ExportError(f"the Hugging Face folder failed its check in a fresh process (status {result.returncode}):"
                          f"\n{result.stderr[-3000:]}{result.stdout[-500:]}")
    return json.loads(result.stdout.rsplit("QKV-REPORT ", 1)[1].splitlines()[0])  # other output may precede it


def compare(report: dict[str, Any], expected: torch.Tensor, mask: torch.Tensor | None,
            expected_text: dict[str, Any]) -> float:
    """Raises ExportError naming every disagreement; returns the largest logit difference
    (over real positions: padded ones are not compared)."""
    problems = []
    if report["modules"]:
        problems.append(f"qkvsearch modules were imported: {report['modules']}")
    if report["shape"] != list(expected.shape):
        raise ExportError(f"the loaded model's logits have shape {report['shape']}, not {list(expected.shape)}")
    got = torch.tensor(report["logits"], dtype=torch.float64).reshape(expected.shape)
    if mask is not None and expected.dim() == 3:  # [batch, seq, outputs]: real positions only
        got, expected = got[mask.bool()], expected[mask.bool()]
    diff, close = difference(got, expected)
    if not close:
        problems.append(f"logits differ by up to {diff:.3g}")
    for name, value in expected_text.items():
        if report.get(name) != value:
            problems.append(f"{name} {report.get(name)!r} differs from the searched model's {value!r}")
    if report["reloaded_difference"] != 0.0:
        problems.append(f"after save_pretrained and from_pretrained the logits moved by {report['reloaded_difference']:.3g}")
    if not report["trained"] or report["train_loss"] != report["train_loss"]:
        problems.append(f"a training step did not train (loss {report['train_loss']})")
    if problems:
        raise ExportError("the Hugging Face folder does not match: " + "; ".join(problems))
    return diff
