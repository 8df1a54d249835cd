"""``format=hf``: a folder the Hugging Face ecosystem loads with ``from_pretrained``.

Where the architecture is exactly a standard family (``hf_families.py``: Llama, Mistral,
GPT-2), the folder is that family's own: its ``config.json``, ``model.safetensors`` under
its weight names, ``generation_config.json``; no remote code. Any other architecture gets
a ``PreTrainedModel`` whose code is the export's standalone source (``hf_remote.py``),
loaded with ``trust_remote_code=True``. With a text task the folder also holds the
tokenizer (``AutoTokenizer`` loads it; ``hf_tokenizer.py``). The card (``README.md``) has the
Hub's YAML metadata. Before the export counts, a fresh process checks the folder
(``hf_check.py``). ``transformers`` is imported only when this format is asked for.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from qkvsearch.search.export import ExportError, ExportJob
from qkvsearch.search.export.card import architecture_table, metrics_table, provenance_lines
from qkvsearch.search.export.check import example_inputs
from qkvsearch.search.export.hf_check import compare, hf_inputs, run_check
from qkvsearch.search.export.hf_families import FAMILIES, Family, fitting
from qkvsearch.search.export.hf_remote import remote_class, remote_config, remote_sources
from qkvsearch.search.export.textcode import decoding_prefix
from qkvsearch.search.export.textio import classify_ids, generate_ids

#: what ``hf.family`` may name: ``auto`` (the first family that fits exactly, else remote code)
FAMILY_CHOICES = ("auto", *FAMILIES, "remote")
NEW_TOKENS = 8  # tokens the check generates greedily


class HuggingFace:
    """The Hugging Face folder, as its main format."""

    name = "hf"

    def __init__(self, family: str = "auto") -> None:
        if family not in FAMILY_CHOICES:
            raise ExportError(f"hf.family: unknown {family!r}; valid: {', '.join(FAMILY_CHOICES)}")
        self.family = family
        self.path, self.auto, self.tag = "", "", ""  # once written: the path it took and why, its Auto class, a tag

    def choose(self, job: ExportJob) -> Family | None:
        """The family to write (None: remote code); a forced family that does not fit is an error."""
        chosen, why = fitting(job.arch)
        if self.family == "remote":
            self.path = "remote code (hf.family=remote)"
            return None
        if self.family != "auto":
            if why[self.family]:
                raise ExportError(f"hf.family={self.family}: the architecture is not exactly {self.family}: "
                                  + "; ".join(why[self.family]))
            chosen = FAMILIES[self.family]
        if chosen is not None:
            self.path = f"native {chosen.name} (model_type {chosen.model_type}): no remote code"
        else:
            self.path = "remote code (no family holds it exactly: " + "; ".join(
                f"{name}: {problems[0]}" for name, problems in why.items()) + ")"
        return chosen

    def write(self, job: ExportJob, folder: pathlib.Path) -> list[str]:
        family = self.choose(job)
        labels = (job.text.spec.get("labels") if job.text is not None else None) or None
        if family is not None:
            auto = "AutoModelForCausalLM"
            self._write_native(job, family, folder)
        else:
            _, auto = remote_class(job.arch)
            for name, source in remote_sources(job.arch).items():
                (folder / name).write_text(source)
            (folder / "config.json").write_text(json.dumps(remote_config(job.arch, labels), indent=1))
            state = {f"net.{k}": v.detach().clone().contiguous() for k, v in job.model.state_dict().items()}
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            if auto == "AutoModelForCausalLM":
                (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "use_cache": False}))
        if job.text is not None:
            from qkvsearch.search.export.hf_tokenizer import save_pretrained

            save_pretrained(job.text.tokenizer, folder)
        self.auto, self.tag = auto, family.name if family is not None else "custom_code"
        diff = self._check(job, folder, auto, remote=family is None)
        return [f"Hugging Face folder: {self.path}", f"checked in a fresh process with transformers, without qkvsearch: "
                f"{auto}.from_pretrained, logits within {diff:.2g} on a padded batch, greedy generate, the tokenizer, "
                "save_pretrained round trip, a training step"]

    def _write_native(self, job: ExportJob, family: Family, folder: pathlib.Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(family.model_type, **family.config(job.arch))
        model = AutoModelForCausalLM.from_config(config)
        state = {k: v.detach().clone() for k, v in family.weights(job.arch, job.model.state_dict()).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ExportError(f"{family.name}: weights that do not map: missing {missing}, unexpected {unexpected}")
        model.generation_config.do_sample = False
        model.save_pretrained(str(folder))

    def _check(self, job: ExportJob, folder: pathlib.Path, auto: str, remote: bool) -> float:
        arch, model = job.arch, job.model.eval()
        inputs = hf_inputs(arch)
        spec: dict[str, Any] = {"auto": auto, "remote": remote, "text": None}
        expected_text: dict[str, Any] = {}
        with torch.no_grad():
            expected = model(*example_inputs(arch)).double()  # the same batch as hf_inputs, in our argument order
        if auto == "AutoModelForCausalLM":
            prompt = inputs["input_ids"][0, :6].tolist()
            spec.update(prompt=prompt, new_tokens=NEW_TOKENS)
            expected_text["generated"] = generate_ids(model, prompt, NEW_TOKENS, temperature=0, window=arch.max_seq_len,
                                                      prefix=decoding_prefix(arch))
        if job.text is not None:
            text = job.text.check.get("prompt") or (job.text.check.get("texts") or [""])[0]
            spec["text"] = text
            expected_text["token_ids"] = job.text.tokenizer.encode(text)
            expected_text["decoded"] = job.text.tokenizer.decode(expected_text["token_ids"])
        report = run_check(folder, inputs, spec)
        if auto == "AutoModelForSequenceClassification":  # the labels it predicts are the searched model's
            rows = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
            ours = classify_ids(model, rows, arch.max_seq_len).argmax(-1)
            theirs = torch.tensor(report["logits"]).reshape(report["shape"]).argmax(-1)
            if not torch.equal(ours, theirs):
                raise ExportError(f"the loaded classifier predicts {theirs.tolist()}, the searched model {ours.tolist()}")
        mask = inputs["attention_mask"] if arch.kind != "encoder_decoder" else inputs["decoder_attention_mask"]
        return compare(report, expected, mask, expected_text)

    def card(self, job: ExportJob, lines: list[str]) -> str:
        arch, source, auto, remote = job.arch, job.provenance, self.auto, self.tag == "custom_code"
        pipeline = {"AutoModelForCausalLM": "text-generation", "AutoModelForSequenceClassification": "text-classification"}
        results = [{"type": "loss" if name.endswith("loss") else "accuracy", "name": f"validation {name}", "value": value}
                   for name, value in zip(source.objectives, source.values, strict=False) if name in ("val_loss", "val_acc")]
        results += [{"type": "loss" if n.endswith("loss") else "accuracy", "name": f"held-out {n}", "value": source.test[n]}
                    for n in ("test_loss", "test_acc") if n in source.test]
        meta = {
            "library_name": "transformers", "pipeline_tag": pipeline.get(auto, "feature-extraction"),
            "tags": ["qkvsearch", "architecture-search", self.tag],
            "model-index": [{"name": f"{source.study}-trial{source.trial}", "results": [{
                "task": {"type": pipeline.get(auto, "feature-extraction")},
                "dataset": {"name": source.task, "type": source.task},
                "metrics": results}]}],
            "qkvsearch": {"study": source.study, "trial": source.trial, "space": source.space, "trials": source.n_trials,
                          "finalist": None if source.finalist is None else
                          {"mean": source.finalist[0], "std": source.finalist[1], "seeds": source.finalist[2]},
                          "test": source.test or None, "baseline": source.baseline},
        }
        load = f"{auto}.from_pretrained(\"path/to/this/folder\"{', trust_remote_code=True' if remote else ''})"
        return f"""---
{yaml.safe_dump(meta, sort_keys=False).rstrip()}
---

# {source.study}, trial {source.trial}

A {arch.kind.replace('_', '-')} Transformer found by qkvsearch, as a Hugging Face model folder
({self.path}).

```python
from transformers import AutoTokenizer, {auto}
model = {load}
```

{architecture_table(arch)}

## Metrics (from the study)

{metrics_table(source)}

## Provenance

{provenance_lines(arch, source, lines)}"""
