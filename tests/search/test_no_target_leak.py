"""No trained architecture can see the token it is scored on predicting.

For every scored position t of a next-token loss, the logits at t must not depend on token
t + 1 (its target). Checked on what the training loss really scores
(``LitTransformer.logits_and_targets``), over random samples of every built-in language
model and sequence-to-sequence space, and over prefix-LM decoders, whose bidirectional
prefix lets position t < prefix_len - 1 see token t + 1.
"""

from __future__ import annotations

import optuna
import pytest
import torch

from qkvsearch.models import ArchConfig
from qkvsearch.search.study.prepare import build_space, build_task
from qkvsearch.search.trial.lit import LitTransformer
from qkvsearch.spaces import Infeasible
from qkvsearch.tasks.base import IGNORE
from tests.conftest import compose_conf

SPACES = {"tiny": ("lm_stdlib", "language_model"), "decoder": ("recall", "language_model"),
          "encoder_decoder": ("reverse", "seq2seq")}


def _leaks(arch: ArchConfig, kind: str, length: int = 12) -> list[int]:
    """Scored positions whose logits change when their own target token changes."""
    torch.manual_seed(0)
    lit = LitTransformer(arch, kind).double().eval()
    vocab = arch.vocab_size
    tokens = torch.randint(0, vocab, (1, length + 1))
    src = torch.randint(0, vocab, (1, length))

    def batch(seq: torch.Tensor) -> dict[str, torch.Tensor]:
        if kind == "seq2seq":
            ones = torch.ones(1, length, dtype=torch.bool)
            return {"src": src, "tgt_in": seq[:, :-1], "tgt_out": seq[:, 1:], "src_padding_mask": ones, "tgt_padding_mask": ones}
        return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}

    with torch.no_grad():
        logits, targets = lit.logits_and_targets(batch(tokens))
        leaks = []
        for t in range(length - 1):
            if targets[t] == IGNORE:
                continue
            changed = tokens.clone()
            changed[0, t + 1] = (changed[0, t + 1] + 1) % vocab  # the target of position t, as an input
            other, _ = lit.logits_and_targets(batch(changed))
            if not torch.allclose(logits[t], other[t], atol=1e-9):
                leaks.append(t)
    return leaks


@pytest.mark.parametrize("prefix_len", [1, 4, 12])
def test_a_prefix_lm_decoder_is_never_scored_on_a_target_it_can_see(prefix_len):
    arch = ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": 16, "max_seq_len": 16, "d_model": 16, "positions": "learned",
        "decoder": {"n_layers": 2, "attention": {"n_heads": 2, "masks": [{"name": "prefix_lm", "prefix_len": prefix_len}]}},
    })
    assert arch.unscored_positions() == max(0, prefix_len - 1)
    assert _leaks(arch, "language_model") == []


@pytest.mark.parametrize("name", sorted(SPACES))
def test_no_architecture_of_a_builtin_space_sees_its_own_targets(name):
    task_name, kind = SPACES[name]
    cfg = compose_conf("space_show", [f"space={name}", f"task={task_name}"])
    space = build_space(cfg, build_task(cfg))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    checked = 0
    while checked < 6:
        trial = study.ask()
        try:
            arch = space.suggest(trial)
        except Infeasible:
            continue
        if arch.d_model > 128 or sum(stack.n_layers for stack in arch.stacks.values()) > 4:
            continue  # the check is the same at any size; keep it fast
        arch = ArchConfig.from_dict({**arch.to_dict(), "max_seq_len": max(arch.max_seq_len, 16)})
        assert _leaks(arch, kind) == [], f"{arch.to_dict()} sees its targets"
        checked += 1
