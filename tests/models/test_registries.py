"""Every registered component of every registry, built: the analytic parameter count (the
n_params each component config declares) equals what the built module holds, and the
component writes itself into an exported model.py that computes what the built one does."""

from __future__ import annotations

import pytest
import torch

from qkvsearch.models import (
    FEEDFORWARDS,
    HEADS,
    MASKS,
    NORMS,
    PLACEMENTS,
    POSITIONS,
    SCALINGS,
    ArchConfig,
    build_model,
    count_parameters,
)
from qkvsearch.models.registry import ConfigError

REGISTRIES = {"scaling": SCALINGS, "mask": MASKS, "positions": POSITIONS, "ffn": FEEDFORWARDS, "norm": NORMS,
              "placement": PLACEMENTS, "head": HEADS}
CASES = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names() if not name.startswith("test_")]


def _decoder(**attention) -> dict:
    return {"kind": "decoder", "vocab_size": 20, "max_seq_len": 12, "d_model": 24,
            "decoder": {"n_layers": 2, "attention": {"n_heads": 4, "n_kv_heads": 2, "masks": ["causal"], **attention}}}


def _encoder(**extra) -> dict:
    return {"kind": "encoder", "vocab_size": 20, "max_seq_len": 12, "d_model": 24,
            "encoder": {"n_layers": 2, "attention": {"n_heads": 4}}, **extra}


def _candidates(kind: str, name: str) -> list[dict]:
    """Architectures that put component ``name`` where a ``kind`` goes (first valid wins)."""
    if kind == "scaling":
        return [_decoder(scaling=name)]
    if kind == "mask":
        return [_decoder(masks=[name]), _decoder(masks=["causal", name]), _encoder(encoder={"n_layers": 2, "attention": {"n_heads": 4, "masks": [name]}})]
    if kind == "positions":
        return [{**_decoder(), "positions": name}]
    if kind == "ffn":
        return [{**_decoder(), "decoder": {**_decoder()["decoder"], "ffn": {"name": name}}}]
    if kind == "norm":
        return [{**_decoder(), "norm": name}]
    if kind == "placement":
        return [{**_decoder(), "norm_placement": name}]
    return [{**_decoder(), "head": name}, _encoder(head={"name": name, "n_classes": 3}), _encoder(head=name)]


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_every_registered_component_counts_its_parameters_exactly(kind, name):
    arch = None
    for data in _candidates(kind, name):
        try:
            arch = ArchConfig.from_dict(data)
            break
        except ConfigError:
            continue
    assert arch is not None, f"no test architecture accepts {kind} {name!r}"
    torch.manual_seed(0)
    assert count_parameters(arch) == sum(p.numel() for p in build_model(arch).parameters())
    for tied in (True, False):  # the head's count with and without a tied embedding, where it can be tied
        try:
            again = ArchConfig.from_dict({**arch.to_dict(), "tie_embeddings": tied})
        except ConfigError:
            continue
        assert count_parameters(again) == sum(p.numel() for p in build_model(again).parameters())


def test_the_cases_cover_every_registry():
    assert {kind for kind, _ in CASES} == set(REGISTRIES)


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_every_registered_component_exports_itself(kind, name):
    import sys
    import types

    from qkvsearch.search.export.check import example_inputs
    from qkvsearch.search.export.codegen import generate_model_source

    arch = next(a for a in (_valid(d) for d in _candidates(kind, name)) if a is not None)
    torch.manual_seed(0)
    model = build_model(arch).eval()
    module = types.ModuleType(f"exported_{kind}_{name}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(generate_model_source(arch), f"{module.__name__}.py", "exec"), module.__dict__)  # noqa: S102 - our own generated code
        exported = module.build().eval()
        exported.load_state_dict(model.state_dict())
        inputs = example_inputs(arch)
        with torch.no_grad():
            torch.testing.assert_close(exported(*inputs), model(*inputs))
    finally:
        del sys.modules[module.__name__]


def _valid(data: dict) -> ArchConfig | None:
    try:
        return ArchConfig.from_dict(data)
    except ConfigError:
        return None
