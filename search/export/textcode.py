"""The text functions ``model.py`` carries for a text task: ``encode``/``decode`` with the
task's own :class:`~qkvsearch.tasks.tokenizer.Tokenizer`, ``generate`` for a decoder language
model (with a key/value cache) and ``predict`` for a classifier, copied from :mod:`.textio`
so they run in an export as they run here."""

from __future__ import annotations

import inspect

from qkvsearch.models import ArchConfig
from qkvsearch.search.export import textio
from qkvsearch.tasks.tokenizer import Tokenizer, padded_rows


def text_functions(arch: ArchConfig) -> list[str]:
    """What an export of ``arch`` offers for text: encode and decode, with generate (a
    decoder language model) or predict (a classifier)."""
    names = ["encode", "decode"]
    if arch.kind == "decoder" and arch.head.name == "lm":
        names.append("generate")
    if arch.head.name == "classifier":
        names += ["predict", "predict_proba"]
    return names


_TEXT_API = '''
#: text.json, read on first use: the task's tokenizer kind (and label names of a classifier).
_TEXT: dict = {}
_NET: dict = {}


def _text() -> dict:
    if not _TEXT:
        folder = pathlib.Path(__file__).resolve().parent
        spec = json.loads((folder / "text.json").read_text())
        _TEXT.update(spec, tokenizer=Tokenizer.load(spec["tokenizer"], folder))
    return _TEXT


def _net(net: nn.Module | None) -> nn.Module:
    if net is not None:
        return net
    if "net" not in _NET:
        _NET["net"] = load()
    return _NET["net"]


def encode(text: str) -> list[int]:
    """The token ids of ``text``, as the model's task made them."""
    return _text()["tokenizer"].encode(text)


def decode(ids: list[int]) -> str:
    """The text of token ids."""
    return _text()["tokenizer"].decode([int(i) for i in ids])
'''

_GENERATE = '''

def generate(prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None, net: nn.Module | None = None) -> str:
    """The text the model writes after ``prompt``: ``max_new_tokens`` tokens, sampled at
    ``temperature`` from the ``top_k`` most likely (greedy at temperature 0), with a key/value
    cache. ``net``: a model from load() (default: this folder's, loaded once)."""
    new = generate_ids(_net(net), encode(prompt), max_new_tokens, temperature=temperature, top_k=top_k,
                       seed=seed, window=MAX_SEQ_LEN, prefix=PREFIX)
    return decode(new)
'''

_PREDICT = '''

def predict_proba(texts: list[str], net: nn.Module | None = None) -> list[dict[str, float]]:
    """Each text's probability per label name."""
    labels = _text()["labels"]
    probs = classify_ids(_net(net), [encode(t) for t in texts], _text()["seq_len"])
    return [dict(zip(labels, row, strict=True)) for row in probs.tolist()]


def predict(texts: list[str], net: nn.Module | None = None) -> list[str]:
    """Each text's most likely label name."""
    return [max(p, key=p.get) for p in predict_proba(texts, net)]
'''


def decoding_prefix(arch: ArchConfig) -> int:
    """The decoder's longest prefix-LM prefix: positions that a cache cannot decode one by one (0: none)."""
    decoder = arch.stacks.get("decoder")
    if decoder is None:
        return 0
    return max((m.bidirectional_prefix() for layer in decoder.layers for m in layer.attention.masks), default=0)


def text_source(arch: ArchConfig) -> str:
    """The text functions of ``model.py`` (read ``text.json`` beside it)."""
    names = text_functions(arch)
    parts = ["\n\n#: The most positions the model attends over, and the prefix-LM prefix (0: none).\n"
             f"MAX_SEQ_LEN = {arch.max_seq_len}\nPREFIX = {decoding_prefix(arch)}\n\n\n", inspect.getsource(Tokenizer), _TEXT_API]
    if "generate" in names:
        parts += ["\n\n", inspect.getsource(textio.sample_token), "\n\n", inspect.getsource(textio.generate_ids), _GENERATE]
    if "predict" in names:
        parts += ["\n\n", inspect.getsource(padded_rows), "\n\n", inspect.getsource(textio.classify_ids), _PREDICT]
    return "".join(parts)
