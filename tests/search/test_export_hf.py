"""``qkv export format=hf``: folders that transformers loads, native where a family holds the
architecture exactly and remote code elsewhere, checked here against the searched model."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import yaml

from qkvsearch.models.errors import QkvError
from qkvsearch.search.base.weights import load_trained
from qkvsearch.search.commands.export import export
from qkvsearch.search.export.check import example_inputs
from qkvsearch.search.export.hf_families import FAMILIES
from qkvsearch.search.export.textio import generate_ids
from qkvsearch.search.inspect.artifacts import trial_weights
from qkvsearch.search.inspect.selection import architecture
from qkvsearch.search.study.prepare import task_of_study
from qkvsearch.search.study.sweep import sweep
from qkvsearch.tasks.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import compose_conf
from tests.tasks.test_text_classification import write_rows

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
SHORT = ["trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.limit_val_batches=2", "n_trials=1",
         "pruner=none", "task.data.train_chars=50000", "task.data.val_chars=5000", "task.data.test_chars=5000"]
KINDS = {"llama": "llama", "mistral": "mistral", "gpt2": "gpt2", "custom": "qkvsearch"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in KINDS:
        cfg = compose_conf("sweep", [f"+space._target_=tests.search.helpers.{name}_space", f"study_name={name}",
                                     f"run_root={root}", *SHORT])
        out[name] = sweep(cfg)
    return root, out


def searched_model(study, root):
    best = study.best_trial
    return load_trained(architecture(study, best), trial_weights(study, best, root)).eval()


@pytest.mark.parametrize("name", list(KINDS))
def test_each_family_and_the_remote_path_load_and_match_the_searched_model(studies, name, capsys):
    root, found = studies
    out = export(compose_conf("export", [f"run_root={root}", f"study_name={name}", "format=hf",
                                         f"out={root / ('export-' + name)}"]))
    native = name != "custom"
    assert (f"hf: native {name}" if native else "hf: remote code (no family holds it exactly") in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == KINDS[name] and (("auto_map" in config) != native)
    assert (out / "modeling_qkvsearch.py").exists() != native
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not native).eval()
    ours = searched_model(found[name], root)
    tokens, mask = example_inputs(ours.config)  # a batch whose second row is padded at the end
    with torch.no_grad():
        theirs, expected = model(input_ids=tokens, attention_mask=mask.long()).logits, ours(tokens, mask)
    assert (theirs[mask] - expected[mask]).abs().max() <= 1e-5
    prompt = tokens[0, :5].tolist()
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 5:]
    assert generated.tolist() == generate_ids(ours, prompt, 10, temperature=0, window=ours.config.max_seq_len)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def main():\n    return 42  # done"
    task = task_of_study(found[name])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == task.tokenizer.encode(text) and tokenizer.decode(ids) == text
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["qkvsearch"]["study"] == name and meta["qkvsearch"]["trial"] == found[name].best_trial.number
    (metric,) = [m for m in meta["model-index"][0]["results"][0]["metrics"] if m["name"] == "validation val_loss"]
    assert metric["value"] == found[name].best_trial.value
    if native:  # a LoRA adapter attaches by the family's usual module names, and trains
        from peft import LoraConfig, get_peft_model

        adapted = get_peft_model(model, LoraConfig(r=4, target_modules=list(FAMILIES[name].lora_modules)))
        trainable = [p for p in adapted.parameters() if p.requires_grad]
        assert trainable and all("lora" in n for n, p in adapted.named_parameters() if p.requires_grad)
        adapted.train()
        loss = adapted(input_ids=tokens, attention_mask=mask.long(), labels=tokens).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)


def test_a_classifier_loads_with_its_labels_and_predicts_as_the_searched_model(tmp_path):
    path = write_rows(tmp_path / "reviews.csv")
    cfg = compose_conf("sweep", ["task=text_classification", "space=encoder", f"task.data.path={path}",
                                 "task.data.text=review", "task.data.label=sentiment", "task.data.seq_len=32",
                                 f"run_root={tmp_path}", *SHORT[:5]])
    study = sweep(cfg)
    out = export(compose_conf("export", [f"run_root={tmp_path}", "format=hf", f"out={tmp_path / 'hf'}"]))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.id2label == {0: "meh", 1: "neg", 2: "pos"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["a good and lovely day number 3", "a bad and awful day"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    tokens = torch.zeros(2, 32, dtype=torch.long)
    mask = torch.zeros(2, 32, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        theirs = model(input_ids=tokens, attention_mask=mask).logits
        ours = searched_model(study, tmp_path)(tokens, mask.bool())
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1)) and (theirs - ours).abs().max() <= 1e-5
    assert yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["pipeline_tag"] == "text-classification"
    from qkvsearch.search.commands.report import render

    (record,) = study.user_attrs["exports"]  # the study knows where its export went, and the report links it
    assert record["format"] == "hf" and record["folder"] == str(out.resolve())
    assert f'<a href="{out.resolve().as_uri()}">' in render(study)


@pytest.mark.parametrize("tokenizer", [Tokenizer("bytes"), Tokenizer("ascii"), Tokenizer("chars", chars=list("abc \n")),
                                       train_tokenizer("bpe", ["the quick brown fox\n" * 20], 300)],
                         ids=["bytes", "ascii", "chars", "bpe"])
def test_every_task_tokenizer_round_trips_through_autotokenizer(tokenizer, tmp_path):
    from qkvsearch.search.export.hf_tokenizer import save_pretrained

    save_pretrained(tokenizer, tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "ab ca\nbc" if tokenizer.kind == "chars" else "the quick brown fox: é ✓\tend\n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(text) and loaded.decode(ids) == tokenizer.decode(ids)


def test_a_family_forced_where_it_does_not_fit_and_an_unknown_one_are_refused_leaving_nothing(studies):
    root, _ = studies
    target = pathlib.Path(root) / "refused"
    with pytest.raises(QkvError, match=r"hf.family=gpt2: the architecture is not exactly gpt2: positions are rotary"):
        export(compose_conf("export", [f"run_root={root}", "study_name=llama", "format=hf", "hf.family=gpt2",
                                       f"out={target}"]))
    with pytest.raises(QkvError, match=r"hf.family: unknown 'bloom'; valid: auto, llama, mistral, gpt2, remote"):
        export(compose_conf("export", [f"run_root={root}", "study_name=llama", "format=hf", "hf.family=bloom",
                                       f"out={target}"]))
    # a component that cannot be written as source (no source method) has no remote code either
    sweep(compose_conf("sweep", ["+space._target_=tests.search.helpers.unexportable_space", "study_name=unexportable",
                                 f"run_root={root}", *SHORT]))
    with pytest.raises(QkvError, match=r"component 'test_poison' \(PoisonConfig\) cannot be written into model.py"):
        export(compose_conf("export", [f"run_root={root}", "study_name=unexportable", "format=hf", f"out={target}"]))
    assert not target.exists() and not list(pathlib.Path(root).glob(".refused.partial-*"))
