"""Our task tokenizers as Hugging Face fast tokenizers: ``AutoTokenizer.from_pretrained`` on
the export folder gives the ids the task gave, and decodes them back to the same text.

- ``bytes``: a byte-level pre-tokenizer (each UTF-8 byte one symbol, GPT-2's byte-to-character
  map) over a vocabulary whose id for a byte is the byte's value;
- ``ascii`` (``lm_stdlib``): one symbol per character, the code point as id below 128, any
  other character 127;
- ``chars``: one symbol per character, ``i + 1`` for the task's ``chars[i]``, 0 for any other;
- ``bpe`` and a user's ``tokenizer.json``: the tokenizer itself.

Characters are joined back without spaces (a ``Fuse`` decoder), so decoding is exact.
"""

from __future__ import annotations

import pathlib
from typing import Any

from qkvsearch.tasks.tokenizer import Tokenizer


def _per_character(vocab: dict[str, int], unknown: str) -> Any:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Fast

    fast = Fast(models.WordLevel(vocab, unk_token=unknown))
    fast.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    fast.decoder = decoders.Fuse()
    return fast


def fast_tokenizer(tokenizer: Tokenizer) -> Any:
    """The ``tokenizers.Tokenizer`` that encodes and decodes as ``tokenizer`` does."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Fast

    if tokenizer.hf is not None:
        return tokenizer.hf
    if tokenizer.kind == "bytes":
        byte_char = _byte_chars()
        fast = Fast(models.WordLevel({byte_char[b]: b for b in range(256)}, unk_token=byte_char[0]))
        fast.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")])
        fast.decoder = decoders.ByteLevel()
        return fast
    if tokenizer.kind == "ascii":
        return _per_character({chr(i): i for i in range(128)}, chr(Tokenizer.ASCII_UNKNOWN))
    unknown = "\ufffd" if "\ufffd" not in tokenizer.chars else "<unk>"
    return _per_character({unknown: 0, **{c: i + 1 for i, c in enumerate(tokenizer.chars)}}, unknown)


def _byte_chars() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters (what the byte-level pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def save_pretrained(tokenizer: Tokenizer, folder: pathlib.Path) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=fast_tokenizer(tokenizer), clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(folder))
