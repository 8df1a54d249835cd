"""``qkv export``: a study's chosen trial as a folder that runs without qkvsearch.

The folder holds ``model.py`` (torch only), ``model.safetensors``, ``config.yaml``,
``README.md`` (a model card) and optionally ONNX and ``torch.export`` programs. When the
study's task reads text, the folder also holds ``text.json`` (the tokenizer's kind, the
label names) and the tokenizer's own file, and ``model.py`` offers ``encode``, ``decode``
and ``generate`` or ``predict``. Before
it reports success, export loads the folder in a fresh Python process where qkvsearch
cannot be imported and compares outputs and parameter count with the searched model.
The folder is written beside its target and renamed into place only when every check
passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import uuid
from importlib import metadata
from typing import Any

import hydra
import optuna
import torch
import yaml
from omegaconf import DictConfig
from safetensors.torch import save_file

from qkvsearch.models import ArchConfig, count_parameters, flops_per_token
from qkvsearch.models.describe import COLUMNS, layer_rows
from qkvsearch.models.errors import QkvError
from qkvsearch.search.configs import run_command
from qkvsearch.search.export import textio
from qkvsearch.search.export.codegen import (
    ExportError,
    decoding_prefix,
    generate_model_source,
    text_functions,
)
from qkvsearch.search.inspect.artifacts import load_trained, trial_weights
from qkvsearch.search.inspect.finalists import finalists
from qkvsearch.search.inspect.selection import complete_trial, ranked
from qkvsearch.search.study.storage import check_study_name, load_named_study
from qkvsearch.tasks.tokenizer import Tokenizer

State = optuna.trial.TrialState
RULES = ("auto", "best", "smallest_within", "best_under")

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


@dataclasses.dataclass
class Chosen:
    """The trial to export and where its weights are."""

    study: optuna.Study
    trial: optuna.trial.FrozenTrial
    arch: ArchConfig
    weights: pathlib.Path


def select_trial(study: optuna.Study, cfg: Any) -> optuna.trial.FrozenTrial:
    """The trial ``cfg`` asks for: a number, or a rule over the complete trials.

    Rules: ``best`` (first objective: the best mean over seeds when the study has
    finalists, else the best trial), ``smallest_within`` (fewest parameters among trials
    whose first objective is within ``within`` of the best, relative), ``best_under`` (best
    first objective with at most ``max_params`` parameters); ``auto`` is ``best`` for a
    single objective and asks for a rule otherwise.
    """
    if cfg.trial is not None:
        return complete_trial(study, cfg.trial)
    if cfg.rule not in RULES:
        raise QkvError(f"rule: unknown {cfg.rule!r}; valid: {', '.join(RULES)}")
    ranks = ranked(study)
    if not ranks:
        raise QkvError(f"study {study.study_name!r} has no complete trial to export")
    rule = cfg.rule
    if rule == "auto":
        if len(study.directions) > 1:
            raise QkvError("the study has several objectives: choose rule=best, rule=smallest_within within=0.05, "
                             "rule=best_under max_params=N, or trial=N")
        rule = "best"
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    if rule == "best":
        table = finalists(study)  # retrained with more seeds: the mean is the better estimate
        return table[0].trial if table else ranks[0]
    if rule == "smallest_within":
        if cfg.within is None or cfg.within < 0:
            raise QkvError(f"within: must be a fraction >= 0, got {cfg.within}")
        best = ranks[0].values[0]
        close = [t for t in ranks if sign * (t.values[0] - best) <= cfg.within * abs(best)]
        return min(close, key=lambda t: (t.user_attrs.get("n_params", 0), sign * t.values[0]))
    if cfg.max_params is None:
        raise QkvError("rule=best_under needs max_params=N")
    under = [t for t in ranks if t.user_attrs.get("n_params", float("inf")) <= cfg.max_params]
    if not under:
        smallest = min(t.user_attrs.get("n_params", 0) for t in ranks)
        raise QkvError(f"no complete trial has at most {cfg.max_params:,} parameters (the smallest has {smallest:,})")
    return under[0]


def choose(cfg: Any) -> Chosen:
    """Opens the study, selects the trial and finds its weights; raises ValueError when any is missing."""
    study = load_named_study(cfg.storage, cfg.study_name)
    trial = select_trial(study, cfg)
    arch = ArchConfig.from_dict(trial.user_attrs["arch"])
    weights = trial_weights(study, trial, cfg.run_root)
    if not cfg.retrain and not weights.is_file():
        raise QkvError(f"trial {trial.number} has no saved weights at {weights}; use retrain=true to train it again")
    return Chosen(study, trial, arch, weights)


@dataclasses.dataclass
class TextSide:
    """How the export reads and writes text: ``text.json``'s content, the tokenizer, and what
    the fresh process is asked to write (``check``) with the answer expected (``expected``)."""

    spec: dict[str, Any]
    tokenizer: Tokenizer
    check: dict[str, Any]
    expected: dict[str, Any]


def text_side(chosen: Chosen, model: torch.nn.Module) -> tuple[TextSide | None, str]:
    """The text side of the export when the study's task reads text (else None), with a
    line for the card saying why there is none where one was expected."""
    from qkvsearch.search.study.run import task_of_study

    arch = chosen.arch
    try:
        task = task_of_study(chosen.study)
    except (QkvError, OSError) as error:
        return None, f"no text functions: the study's task could not be rebuilt here ({error})"
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


def check_folder(folder: pathlib.Path, model: torch.nn.Module, arch: ArchConfig, atol: float = 1e-5,
                 text: TextSide | None = None) -> dict[str, Any]:
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
        difference = float((got - expected).abs().max())
        if not difference <= atol * (1 + float(expected.abs().max())):
            problems.append(f"outputs differ by up to {difference:.3g} (tolerance {atol:g})")
        report["max_abs_difference"] = difference
    for name, value in (text.expected if text else {}).items():
        if report["text"].get(name) != value:
            problems.append(f"{name} {report['text'].get(name)!r} differs from the model's {value!r}")
    if problems:
        raise ExportError("the exported model does not match: " + "; ".join(problems))
    return report


def _versions() -> dict[str, str]:
    try:
        ours = metadata.version("qkvsearch")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {"qkvsearch": ours, "torch": torch.__version__, "python": sys.version.split()[0]}


def portable(path: pathlib.Path, run_root: str | pathlib.Path) -> str:
    """``path`` as the card shows it: under ``<run_root>/`` or the working folder, never an
    absolute path of the exporting machine."""
    path = pathlib.Path(path).resolve()
    for base, label in ((pathlib.Path(run_root).resolve(), "<run_root>/"), (pathlib.Path.cwd().resolve(), "")):
        if path.is_relative_to(base):
            return label + str(path.relative_to(base))
    return path.name


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


def model_card(chosen: Chosen, weights: str, check: dict[str, Any], extras: list[str], text: TextSide | None = None) -> str:
    """The folder's README.md (``weights``: where they came from, as :func:`portable` says)."""
    arch, trial, study = chosen.arch, chosen.trial, chosen.study
    objectives = study.user_attrs.get("objectives") or [f"objective {i}" for i in range(len(trial.values))]
    metrics = "\n".join(f"| {name} | {value:.6g} |" for name, value in zip(objectives, trial.values, strict=False))
    test = (study.user_attrs.get("test_scores") or {}).get(str(trial.number), {})
    metrics += "".join(f"\n| {name} (held-out test split, not selected on) | {test[name]:.6g} |"
                       for name in ("test_loss", "test_acc") if name in test)
    seeds = next((f for f in finalists(study) if f.trial.number == trial.number), None)
    if seeds is not None:
        metrics += f"\n| {objectives[0]}, mean over {len(seeds.values)} seeds (finalist) | {seeds.mean:.6g} ± {seeds.std:.2g} |"
    rows = layer_rows(arch)
    table = "\n".join("| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows)
    versions = _versions()
    return f"""# {study.study_name}, trial {trial.number}

A {arch.kind.replace('_', '-')} Transformer found by qkvsearch. `model.py` depends on torch alone:

```python
import model                  # with this folder on sys.path
net = model.load()            # builds the architecture, loads model.safetensors, eval mode
```
{text_usage(arch, text)}
| | |
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
{table}

## Metrics (from the study)

| objective | value |
| --- | --- |
{metrics}

## Provenance

- study: `{study.study_name}`, trial {trial.number}{f" (same architecture as trial {trial.user_attrs['duplicate_of']})" if 'duplicate_of' in trial.user_attrs else ''}
- task: {study.user_attrs.get('task', 'unknown')}, space: {study.user_attrs.get('space', 'unknown')}; trained with qkvsearch {study.user_attrs.get('code_version', 'unknown')}
- weights: {weights}
- architecture hash: {arch.fingerprint()}
- exported {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} with qkvsearch {versions['qkvsearch']}, torch {versions['torch']}, Python {versions['python']}
- checked in a fresh process without qkvsearch: outputs within {check.get('max_abs_difference', 0):.2g}, {check['n_params']:,} parameters
{''.join(f"- {extra}{chr(10)}" for extra in extras)}"""


def retrain(cfg: DictConfig, chosen: Chosen) -> pathlib.Path:
    """Trains the chosen architecture longer with ``qkv train``; returns its weights."""
    from qkvsearch.search.commands.train import train
    from qkvsearch.search.configs import compose_config

    # qkv train rebuilds the task from the config the study recorded
    overrides = [f"study_name={chosen.study.study_name}", f"trial={chosen.trial.number}",
                 f"run_root={cfg.run_root}", *cfg.retrain_overrides]
    train_cfg = compose_config("train", overrides)
    train_cfg.storage = cfg.storage
    return train(train_cfg) / "model.safetensors"


def export(cfg: DictConfig) -> pathlib.Path:
    """Writes and checks the export folder; returns its path."""
    chosen = choose(cfg)
    if not cfg.out:
        check_study_name(chosen.study.study_name)  # the default folder is named after it: keep it inside exports/
    out = pathlib.Path(cfg.out or pathlib.Path("exports") / f"{chosen.study.study_name}-trial{chosen.trial.number}")
    if out.exists() and not cfg.overwrite:
        raise QkvError(f"output folder {out} exists; choose out=... or overwrite=true")
    weights = retrain(cfg, chosen) if cfg.retrain else chosen.weights
    model = load_trained(chosen.arch, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()  # the user's umask, not mkdtemp's 0700: the folder is meant to be shared
    try:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(partial / "model.safetensors"), metadata={"arch_hash": chosen.arch.fingerprint()})
        text, why_no_text = text_side(chosen, model)
        if text is not None:
            text.tokenizer.save(partial)
            (partial / "text.json").write_text(json.dumps(text.spec, indent=1))
        (partial / "model.py").write_text(generate_model_source(chosen.arch, text=text is not None))
        (partial / "config.yaml").write_text(yaml.safe_dump(chosen.arch.to_dict(), sort_keys=False))
        check = check_folder(partial, model, chosen.arch, text=text)
        extras = [why_no_text] if why_no_text else []
        if cfg.onnx:
            extras.append(export_onnx(model, chosen.arch, partial))
        if cfg.torch_export:
            extras.append(export_program(model, chosen.arch, partial))
        (partial / "README.md").write_text(model_card(chosen, portable(weights, cfg.run_root), check, extras, text))
        umask = os.umask(0)
        os.umask(umask)
        for path in partial.iterdir():  # safetensors writes 0600; an export is meant to be shared
            path.chmod(0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def export_onnx(model: torch.nn.Module, arch: ArchConfig, folder: pathlib.Path, atol: float = 1e-4) -> str:
    """Writes ``model.onnx`` and checks it with onnxruntime against the model."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"onnx=true needs onnx, onnxscript and onnxruntime (pip install 'qkvsearch[onnx]'): {error}") from None
    inputs = example_inputs(arch)
    names = ["src", "tgt", "src_padding_mask", "tgt_padding_mask"] if arch.kind == "encoder_decoder" else ["tokens", "padding_mask"]
    path = folder / "model.onnx"
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(model.eval(), tuple(inputs), str(path), input_names=names, output_names=["output"], dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        expected = model(*inputs)
    difference = float((got - expected).abs().max())
    if difference > atol * (1 + float(expected.abs().max())):
        raise ExportError(f"ONNX outputs differ from the model by up to {difference:.3g}")
    return f"model.onnx: checked with onnxruntime {onnxruntime.__version__}, outputs within {difference:.2g}"


def export_program(model: torch.nn.Module, arch: ArchConfig, folder: pathlib.Path, atol: float = 1e-5) -> str:
    """Writes ``model.pt2`` (a ``torch.export`` program) and checks it against the model."""
    inputs = tuple(example_inputs(arch))
    program = torch.export.export(model.eval(), inputs)
    path = folder / "model.pt2"
    torch.export.save(program, str(path))
    with torch.no_grad():
        got = torch.export.load(str(path)).module()(*inputs)
        expected = model(*inputs)
    difference = float((got - expected).abs().max())
    if difference > atol * (1 + float(expected.abs().max())):
        raise ExportError(f"the torch.export program differs from the model by up to {difference:.3g}")
    return f"model.pt2: torch.export program, outputs within {difference:.2g}"


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``qkv export``."""
    out = run_command(export, cfg)
    print(f"exported to {out} (checked in a fresh process without qkvsearch)")
