"""A registered test component and Python spaces, used through the real extension points."""

from __future__ import annotations

import dataclasses
import weakref

import optuna
import torch
from torch import nn

from qkvsearch.models import FEEDFORWARDS, ArchConfig
from qkvsearch.models.feedforward import FeedForwardConfig


@dataclasses.dataclass(frozen=True)
class PoisonConfig(FeedForwardConfig):
    """A feed-forward layer that goes NaN or raises once training has begun (tests only)."""

    mode: str = "nan"


#: Weak references to every Poison layer built, so a test can check that none is kept alive.
BUILT: list[weakref.ref] = []


class Poison(nn.Module):
    def __init__(self, d_model: int, mode: str) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)
        self.mode = mode
        BUILT.append(weakref.ref(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.mode == "raise":
            raise RuntimeError("poisoned layer raised on purpose")
        if self.training and self.mode == "oom":  # what the CUDA caching allocator raises
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)")
        out = self.proj(x)
        return out * float("nan") if self.training and self.mode == "nan" else out


if "test_poison" not in FEEDFORWARDS:
    FEEDFORWARDS.register("test_poison", PoisonConfig)(lambda config, *, d_model: Poison(d_model, config.mode))


def _arch(cfg, ffn: dict) -> ArchConfig:
    return ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": cfg.task.vocab_size, "max_seq_len": cfg.task.seq_len, "d_model": 16,
        "positions": "learned",
        "decoder": {"n_layers": 1, "attention": {"n_heads": 2, "masks": ["causal"]}, "ffn": ffn},
    })


def flaky_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """Trial 1 goes NaN, trial 2 raises, the others train normally."""
    width = trial.suggest_int("d_ff", 8, 64)
    variant = {1: "nan", 2: "raise"}.get(trial.number)
    if variant:
        return _arch(cfg, {"name": "test_poison", "mode": variant, "d_ff": width})
    return _arch(cfg, {"name": "gelu", "d_ff": width})


def oom_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """Trial 1 runs out of memory in its first step, the others train normally."""
    width = trial.suggest_int("d_ff", 8, 64)
    return _arch(cfg, {"name": "test_poison" if trial.number == 1 else "gelu", "mode": "oom", "d_ff": width}
                 if trial.number == 1 else {"name": "gelu", "d_ff": width})


def fixed_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """One architecture, whatever the trial."""
    trial.suggest_categorical("only", ["one"])
    return _arch(cfg, {"name": "gelu", "d_ff": 32})


def dies_in_extra_workers(trial: optuna.Trial, cfg) -> ArchConfig:
    """Raises in an extra worker of `qkv sweep workers=N` (so it dies at start-up), and
    samples the fixed architecture in the first process."""
    import os

    if "QKV_SPAWNED_BY" in os.environ:
        raise RuntimeError("this extra worker fails on purpose")
    return fixed_space(trial, cfg)


def _decoder(cfg, **arch) -> ArchConfig:
    layer = {"n_layers": 2, "attention": {"n_heads": 4, "n_kv_heads": 2, "masks": ["causal"]},
             "ffn": {"name": "swiglu", "d_ff": 48}}
    layer.update(arch.pop("decoder", {}))
    return ArchConfig.from_dict({"kind": "decoder", "vocab_size": cfg.task.vocab_size, "max_seq_len": cfg.task.seq_len,
                                 "d_model": 32, "positions": "rotary", "norm": "rmsnorm", "tie_embeddings": True,
                                 "decoder": layer, **arch})


def llama_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """Exactly a Llama: rotary, RMSNorm, SwiGLU, grouped-query heads."""
    trial.suggest_categorical("only", ["one"])
    return _decoder(cfg)


def mistral_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """A Llama with a sliding window: exactly a Mistral."""
    trial.suggest_categorical("only", ["one"])
    return _decoder(cfg, decoder={"attention": {"n_heads": 4, "n_kv_heads": 2,
                                                "masks": ["causal", {"name": "sliding_window", "window": 8}]}})


def gpt2_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """Exactly a GPT-2: learned positions, LayerNorm, GELU, tied embeddings."""
    trial.suggest_categorical("only", ["one"])
    return _decoder(cfg, positions="learned", norm="layernorm",
                    decoder={"attention": {"n_heads": 4, "masks": ["causal"]}, "ffn": {"name": "gelu", "d_ff": 64}})


def custom_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """No family's: ALiBi, QK-norm, and layers of different widths."""
    trial.suggest_categorical("only", ["one"])
    return _decoder(cfg, positions="alibi", decoder={"attention": {"n_heads": 4, "scaling": "qk_norm", "masks": ["causal"]},
                                                     "layers": [{}, {"ffn": {"d_ff": 96}}]})


def unexportable_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """A decoder whose feed-forward is a component without a ``source`` method (trains normally)."""
    trial.suggest_categorical("only", ["one"])
    return _arch(cfg, {"name": "test_poison", "mode": "fine", "d_ff": 32})


def wide_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """A decoder of ~200 M parameters (3.2 GB of weights, gradients and AdamW state)."""
    trial.suggest_categorical("only", ["one"])
    return ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": cfg.task.vocab_size, "max_seq_len": cfg.task.seq_len, "d_model": 2048,
        "positions": "learned", "decoder": {"n_layers": 4, "attention": {"n_heads": 16, "masks": ["causal"]}}})


def heavy_space(trial: optuna.Trial, cfg) -> ArchConfig:
    """A decoder whose weights (~470 KB of safetensors) outgrow a 300 KB file-size limit."""
    width = trial.suggest_int("d_ff", 256, 264)
    return ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": cfg.task.vocab_size, "max_seq_len": cfg.task.seq_len, "d_model": 64,
        "positions": "learned", "decoder": {"n_layers": 2, "attention": {"n_heads": 2, "masks": ["causal"]},
                                            "ffn": {"name": "gelu", "d_ff": width}}})
