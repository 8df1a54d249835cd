"""The text side of an export: when the study's task reads text, the folder also holds
``text.json`` (the tokenizer's kind; a classifier's label names and ``seq_len``) and the
tokenizer's own file, and ``model.py`` offers ``encode``, ``decode`` and ``generate`` or
``predict``. What the fresh process is asked to write, and the answer it must give, are
worked out here from the searched model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from qkvsearch.models import ArchConfig
from qkvsearch.search.export import textio
from qkvsearch.search.export.textcode import decoding_prefix, text_functions
from qkvsearch.tasks.tokenizer import Tokenizer


@dataclasses.dataclass
class TextSide:
    """How the export reads and writes text: ``text.json``'s content, the tokenizer, and what
    the fresh process is asked to write (``check``) with the answer expected (``expected``)."""

    spec: dict[str, Any]
    tokenizer: Tokenizer
    check: dict[str, Any]
    expected: dict[str, Any]


def text_side(arch: ArchConfig, model: torch.nn.Module, task: Any) -> tuple[TextSide | None, str]:
    """The text side of the export when ``task`` reads text (else None), with a line for the
    card saying why there is none where one was expected."""
    tokenizer = getattr(task, "tokenizer", None)
    if not isinstance(tokenizer, Tokenizer):
        return None, ""  # the task's inputs are not text (digits, the synthetic tasks)
    spec: dict[str, Any] = {"tokenizer": tokenizer.kind}
    sample = task.sample_batch(3)
    names = text_functions(arch)
    model = model.eval()
    if "generate" in names:
        prompt = tokenizer.decode(sample["tokens"][0][:8].tolist())
        ids = textio.generate_ids(model, tokenizer.encode(prompt), 12, temperature=0, window=arch.max_seq_len,
                                  prefix=decoding_prefix(arch))
        check, expected = {"prompt": prompt, "max_new_tokens": 12}, {"generated": tokenizer.decode(ids)}
    elif "predict" in names:
        labels, seq_len = list(getattr(task, "label_names", []) or []), int(getattr(task, "seq_len", 0))
        if len(labels) != arch.head.n_outputs(arch.vocab_size) or seq_len < 1:
            return None, "no text functions: the task names no labels for the classifier's outputs"
        spec.update(labels=labels, seq_len=seq_len)
        texts = [tokenizer.decode(row[mask].tolist()) for row, mask in zip(sample["tokens"], sample["padding_mask"], strict=True)]
        probs = textio.classify_ids(model, [tokenizer.encode(t) for t in texts], seq_len)
        check, expected = {"texts": texts}, {"predicted": [labels[i] for i in probs.argmax(-1).tolist()]}
    else:
        check, expected = {}, {}
    return TextSide(spec, tokenizer, check, expected), ""


def text_usage(arch: ArchConfig, text: TextSide | None) -> str:
    """The card's lines on text: a two-line example and what the tokenizer is."""
    if text is None:
        return ""
    names = text_functions(arch)
    needs = " and `tokenizers`" if text.tokenizer.hf is not None else ""
    kind = {"bytes": "UTF-8 bytes", "ascii": "ASCII characters (others as 127)", "chars": "one id per character (chars.json)"}
    lines = [f"\nIt reads text as its task did: {kind.get(text.tokenizer.kind, 'the tokenizer in tokenizer.json')}, "
             f"{text.tokenizer.vocab_size} ids (torch{needs}).\n\n```python\nimport model\n"]
    if "generate" in names:
        prompt = text.check["prompt"]
        lines.append(f"print(model.generate({prompt!r}, max_new_tokens=200, temperature=0.8, top_k=40))\n```\n")
    elif "predict" in names:
        lines.append(f"print(model.predict({text.check['texts'][:2]!r}))  # labels: {', '.join(text.spec['labels'])}\n```\n")
    else:
        lines.append("ids = model.encode('some text'); print(model.decode(ids))\n```\n")
    lines.append(f"\n`model.py` offers {', '.join(f'`{n}`' for n in names)}.\n")
    return "".join(lines)
