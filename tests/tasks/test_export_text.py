"""Exports of text tasks read and write text in a fresh process without qkvsearch:
``generate`` for a language model (with a key/value cache), ``predict`` for a classifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qkvsearch.models import ArchConfig
from qkvsearch.search.base.weights import load_trained
from qkvsearch.search.commands.export import export
from qkvsearch.search.inspect.artifacts import trial_weights
from qkvsearch.search.inspect.selection import architecture
from qkvsearch.search.study.prepare import task_of_study
from qkvsearch.search.study.sweep import sweep
from tests.conftest import compose_conf
from tests.tasks.test_corpus import write_corpus
from tests.tasks.test_text_classification import write_rows

SHORT = ["trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "n_trials=1", "pruner=none"]


def run_export(folder, code: str) -> object:
    """Runs ``code`` in a fresh interpreter in the export folder, with qkvsearch out of reach;
    returns the JSON it prints last."""
    blocked = ("import importlib.abc, sys\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('qkvsearch', 'models', 'search', 'tasks'):\n"
               "            raise ImportError(name)\n"
               "sys.meta_path.insert(0, Block())\nsys.path.insert(0, '.')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", blocked + code], cwd=folder, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def greedy_without_cache(net: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """The greedy continuation, running the whole sequence at every step (no cache)."""
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(net(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(ids):]


@pytest.mark.parametrize(("tokenizer", "extra"), [("bpe", ["task.data.vocab_size=300"])])  # chars: as bytes, chars.json
def test_an_exported_language_model_generates_text_in_a_fresh_process(tmp_path, tokenizer, extra):
    write_corpus(tmp_path)
    cfg = compose_conf("sweep", ["task=text", f"task.data.paths=[{tmp_path}/corpus/**/*.txt]", "task.data.seq_len=24",
                                 f"task.data.tokenizer={tokenizer}", *extra, "task.data.val_fraction=0.2",
                                 "task.data.val_batches=2", f"run_root={tmp_path}", *SHORT])
    study = sweep(cfg)
    out = export(compose_conf("export", [f"run_root={tmp_path}", f"out={tmp_path / 'export'}"]))
    expected_files = {"model.py", "model.safetensors", "config.yaml", "README.md", "text.json"}
    assert {p.name for p in out.iterdir()} == expected_files | {"tokenizer.json" if tokenizer == "bpe" else "chars.json"}
    card = (out / "README.md").read_text()
    assert "print(model.generate(" in card and "`generate`" in card

    prompt = "the quick brown fox jumps"  # 25 characters: longer than seq_len 24, so the window slides
    got = run_export(out, "import json, model\n"
                          f"prompt = {prompt!r}\n"
                          "ids = model.encode(prompt)\n"
                          "print(json.dumps({'ids': ids, 'round_trip': model.decode(ids),\n"
                          "  'greedy': model.generate(prompt, 30, temperature=0),\n"
                          "  'top1': model.generate(prompt, 30, top_k=1, seed=1),\n"
                          "  'sampled': [model.generate(prompt, 30, temperature=1.0, seed=s) for s in (7, 7, 8)]}))")
    task = task_of_study(study)
    assert got["ids"] == task.tokenizer.encode(prompt) and got["round_trip"] == prompt
    best = study.best_trial
    net = load_trained(architecture(study, best), trial_weights(study, best, tmp_path)).eval()
    window = net.config.max_seq_len
    # the reference sees the same window as generate: the prompt's latest 24 tokens, then half of them
    reference_ids, context = [], got["ids"][-window:]
    for _ in range(30):
        if len(context) > window:
            context = context[-(window // 2):]
        token = greedy_without_cache(net, context, 1)[0]
        reference_ids.append(token)
        context.append(token)
    assert got["greedy"] == task.tokenizer.decode(reference_ids)
    assert got["top1"] == got["greedy"]  # top_k=1 samples the most likely token
    assert got["sampled"][0] == got["sampled"][1]  # a seed makes sampling repeatable


def test_cached_generation_matches_the_uncached_within_one_window():
    from qkvsearch.models import build_model
    from qkvsearch.search.export.textio import generate_ids

    arch = ArchConfig.from_dict({"kind": "decoder", "vocab_size": 13, "max_seq_len": 40, "d_model": 16,
                                 "positions": "rotary", "decoder": {"n_layers": 2, "attention": {
                                     "n_heads": 4, "n_kv_heads": 2, "masks": [{"name": "prefix_lm", "prefix_len": 5}]}}})
    torch.manual_seed(0)
    net = build_model(arch).eval()
    for prompt in ([3], [3, 1, 4, 1, 5, 9]):  # shorter than the prefix, and past it
        assert generate_ids(net, prompt, 20, temperature=0, window=40, prefix=5) == greedy_without_cache(net, prompt, 20)


def test_an_exported_classifier_predicts_label_names_in_a_fresh_process(tmp_path):
    path = write_rows(tmp_path / "reviews.csv")
    cfg = compose_conf("sweep", ["task=text_classification", "space=encoder", f"task.data.path={path}",
                                 "task.data.text=review", "task.data.label=sentiment", "task.data.seq_len=32",
                                 f"run_root={tmp_path}", *SHORT])
    study = sweep(cfg)
    out = export(compose_conf("export", [f"run_root={tmp_path}", f"out={tmp_path / 'export'}"]))
    assert json.loads((out / "text.json").read_text()) == {"tokenizer": "bytes", "labels": ["meh", "neg", "pos"], "seq_len": 32}
    assert "print(model.predict(" in (out / "README.md").read_text()
    texts = ["a good and lovely day number 3", "a bad and awful day", ""]
    got = run_export(out, "import json, model\n"
                          f"texts = {texts!r}\n"
                          "print(json.dumps({'labels': model.predict(texts), 'proba': model.predict_proba(texts)}))")
    task = task_of_study(study)
    best = study.best_trial
    net = load_trained(architecture(study, best), trial_weights(study, best, tmp_path)).eval()
    tokens = torch.zeros(3, 32, dtype=torch.long)
    mask = torch.zeros(3, 32, dtype=torch.bool)
    for i, text in enumerate(texts):
        ids = task.tokenizer.encode(text)[:32] or [0]
        tokens[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), True
    with torch.no_grad():
        probs = net(tokens, mask).softmax(-1)
    assert got["labels"] == [task.label_names[i] for i in probs.argmax(-1).tolist()]
    for row, expected in zip(got["proba"], probs.tolist(), strict=True):
        assert list(row) == ["meh", "neg", "pos"]
        assert list(row.values()) == pytest.approx(expected, abs=1e-5)
