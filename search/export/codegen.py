"""Writes ``model.py``: standalone PyTorch source for one architecture.

The file holds the source of exactly the module classes the built model uses (taken
from ``models/``, so the exported model computes what the searched one did), a
``build()`` that constructs this architecture with literal sizes, and ``load()`` with a
small safetensors reader, so it depends on torch alone. Each component's config writes
its own constructor expression (its ``source`` method, beside the component in ``models/``).

With a text task, ``model.py`` also reads and writes text (:mod:`.textcode`).
"""

from __future__ import annotations

import graphlib
import inspect
import re
import sys
import textwrap
from typing import Any

from torch import nn

from qkvsearch.models import (
    ArchConfig,
    AttentionConfig,
    LayerConfig,
    build_model,
    count_parameters,
    flops_per_token,
)
from qkvsearch.models.cache import cached
from qkvsearch.models.describe import layer_rows
from qkvsearch.models.masks import MaskContext
from qkvsearch.models.registry import ComponentConfig
from qkvsearch.search.export import ExportError
from qkvsearch.search.export.textcode import text_functions, text_source


def _expr(config: ComponentConfig, **sizes: Any) -> str:
    """The constructor expression the component's config writes for itself (``source``)."""
    try:
        return config.source(**sizes)
    except NotImplementedError:
        raise ExportError(
            f"component {config.name!r} ({type(config).__name__}) cannot be written into model.py: "
            f"give its config a source({', '.join(sizes)}) method returning its constructor call"
        ) from None


def _attention(config: AttentionConfig, d_model: int, cross: bool) -> str:
    h, g, d_k, d_v, bias = config.n_heads, config.n_kv_heads, config.d_k, config.d_v, config.bias
    masks = ", ".join(_expr(m, self_attention=not cross) for m in config.masks)
    geometry = f"n_heads={h}, n_kv_heads={g}, d_k={d_k}, d_v={d_v}"
    if cross:
        project = (f"CrossProjection(nn.Linear({d_model}, {h * d_k}, bias={bias}), "
                   f"nn.Linear({d_model}, {g * (d_k + d_v)}, bias={bias}), {geometry})")
    else:
        project = f"SelfProjection(nn.Linear({d_model}, {h * d_k + g * (d_k + d_v)}, bias={bias}), {geometry})"
    return (
        f"MultiHeadAttention(\n"
        f"            {geometry},\n"
        f"            project={project},\n"
        f"            out_proj=nn.Linear({h * d_v}, {d_model}, bias={bias}),\n"
        f"            scaling={_expr(config.scaling, n_heads=h, d_k=d_k)},\n"
        f"            mask=CombinedMask([{masks}]),\n"
        f"            positions={'Positions()' if cross else 'positions'},\n"
        f"            dropout={config.dropout!r},\n"
        f"        )"
    )


def _layer_function(name: str, arch: ArchConfig, layer: LayerConfig) -> str:
    d = arch.d_model
    norm = _expr(arch.norm, d_model=d)
    residual = _expr(arch.norm_placement, norm=norm, dropout=arch.dropout)
    cross = ""
    if layer.cross_attention is not None:
        cross = (f"        cross_attention={_attention(layer.cross_attention, d, cross=True)},\n"
                 f"        cross_residual={residual},\n")
    a = layer.attention
    doc = f"{a.n_heads} heads ({a.n_kv_heads} key/value), d_k {a.d_k}, d_v {a.d_v}, {layer.ffn.name} d_ff {layer.ffn.d_ff}"
    return (
        f"def {name}(positions: Positions) -> TransformerLayer:\n"
        f'    """{doc}."""\n'
        f"    return TransformerLayer(\n"
        f"        self_attention={_attention(a, d, cross=False)},\n"
        f"        self_residual={residual},\n"
        f"{cross}"
        f"        feedforward={_expr(layer.ffn, d_model=d)},\n"
        f"        ffn_residual={residual},\n"
        f"    )\n"
    )


def _build_function(arch: ArchConfig) -> str:
    """``build()`` and one function per distinct layer, with literal sizes."""
    functions: dict[LayerConfig, str] = {}
    body = []
    d = arch.d_model
    final = _expr(arch.norm, d_model=d) if arch.norm_placement.final_norm else "nn.Identity()"
    for stack_name, stack in arch.stacks.items():
        calls = []
        for layer in stack.layers:
            if layer not in functions:
                functions[layer] = f"_layer_{len(functions)}"
            calls.append(f"{functions[layer]}(positions)")
        positions = _expr(arch.positions, d_model=d, max_seq_len=arch.max_seq_len)
        body.append(
            f"    positions = {positions}\n"
            f"    {stack_name} = Stack(\n"
            f"        embedding=nn.Embedding({arch.vocab_size}, {d}),\n"
            f"        positions=positions,\n"
            f"        layers=[{', '.join(calls)}],\n"
            f"        final_norm={final},\n"
            f"        dropout={arch.dropout!r},\n"
            f"    )\n"
        )
    head = _expr(arch.head, d_model=d, vocab_size=arch.vocab_size)
    body.append(f"    head = {head}\n")
    if arch.tie_embeddings:
        body.append(f"    head.proj.weight = {'decoder' if arch.decoder else 'encoder'}.embedding.weight\n")
    if arch.kind == "encoder_decoder":
        body.append("    return EncoderDecoderModel(CONFIG, encoder, decoder, head)\n")
    else:
        body.append(f"    return StackModel(CONFIG, {next(iter(arch.stacks))}, head)\n")
    layers = "\n\n".join(_layer_function(name, arch, layer) for layer, name in functions.items())
    build = 'def build() -> nn.Module:\n    """Builds the architecture with fresh weights (use load() for the trained ones)."""\n'
    return layers + "\n\n" + build + "".join(body)


def _classes_used(model: nn.Module) -> list[type]:
    """Every non-torch class of the model's modules, with their non-torch bases, bases first."""
    ordered: list[type] = []

    def add(cls: type) -> None:
        if cls in ordered or cls.__module__.startswith("torch") or cls in (object, nn.Module):
            return
        for base in cls.__bases__:
            add(base)
        ordered.append(cls)

    for module in model.modules():
        add(type(module))
    return _dependency_order(ordered)


def _dependency_order(classes: list[type]) -> list[type]:
    """``classes`` with each after its bases and the classes its source names (the parts
    before the whole, as a reader meets them); the found order where names form a cycle."""
    names = {cls.__name__: cls for cls in classes}
    graph = {}
    for cls in classes:
        words = set(re.findall(r"\b[A-Z]\w*\b", inspect.getsource(cls)))
        graph[cls] = {names[w] for w in words if w in names and names[w] is not cls} | {
            b for b in cls.__bases__ if b in classes}
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return classes


def _helpers(sources: list[str], modules: set[str], skip: set[str]) -> list[Any]:
    """Module-level functions and classes of ``modules`` that the sources call, transitively."""
    found: list[Any] = []
    text = "\n".join(sources)
    changed = True
    while changed:
        changed = False
        for module_name in sorted(modules):
            for name, obj in vars(sys.modules[module_name]).items():
                if name in skip or obj in found or getattr(obj, "__module__", None) != module_name:
                    continue
                if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                if re.search(rf"\b{re.escape(name)}\b", text):
                    found.append(obj)
                    text += "\n" + inspect.getsource(obj)
                    changed = True
    return found


def _safetensors_reader() -> str:
    return textwrap.dedent('''
        _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                   "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                   "BOOL": torch.bool}


        def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
            """Reads a safetensors file (an 8-byte header size, a JSON header, raw little-endian data); no pickle."""
            data = pathlib.Path(path).read_bytes()
            size = int.from_bytes(data[:8], "little")
            try:
                if len(data) < 8 or size > len(data) - 8:
                    raise ValueError(f"its header says {size} bytes, the file holds {len(data)}")
                header = json.loads(data[8 : 8 + size])
            except (ValueError, UnicodeDecodeError) as error:
                raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
            header.pop("__metadata__", None)
            body = memoryview(data)[8 + size :]
            tensors = {}
            for name, info in header.items():
                start, end = info["data_offsets"]
                dtype = _DTYPES[info["dtype"]]
                raw = body[start:end]
                flat = torch.frombuffer(bytearray(raw), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
                tensors[name] = flat.reshape(info["shape"])
            return tensors


        def load(folder: str | os.PathLike | None = None, device: str = "cpu") -> nn.Module:
            """Builds the model and loads ``model.safetensors`` from ``folder`` (default: this file's
            folder); returns it in eval mode."""
            folder = pathlib.Path(folder) if folder is not None else pathlib.Path(__file__).resolve().parent
            model = build()
            model.load_state_dict(read_safetensors(folder / "model.safetensors"))
            return model.to(device).eval()
    ''')


def _docstring(arch: ArchConfig, text: bool) -> str:
    lines = [
        f"A {arch.kind.replace('_', '-')} Transformer exported by qkvsearch; it depends on torch alone.",
        "",
        f"d_model {arch.d_model}, vocabulary {arch.vocab_size}, up to {arch.max_seq_len} positions, "
        f"positions {arch.positions.name}, {arch.norm_placement.name}-{arch.norm.name}, head {arch.head.name}"
        + (" (tied to the embedding)" if arch.tie_embeddings else "") + ".",
        f"{count_parameters(arch):,} parameters, {flops_per_token(arch):,} forward FLOPs per token.",
        "",
    ]
    for row in layer_rows(arch):
        cross = f"; cross-attention {row['cross heads']} heads" if row["cross heads"] != "-" else ""
        lines.append(f"  {row['layer']}: {row['heads']} heads / {row['kv heads']} kv, d_k {row['d_k']}, d_v {row['d_v']}, "
                     f"{row['scaling']}, {row['masks']}; {row['ffn']} d_ff {row['d_ff']}{cross}")
    lines += ["", "Usage::", "", "    import model", "    net = model.load()          # trained weights, eval mode",
              "    logits = net(tokens)        # see the forward of the class build() returns"]
    if text:
        lines += [f"    # text in and out (text.json beside this file): {', '.join(text_functions(arch))}"]
    return '"""' + "\n".join(lines) + '\n"""'


def generate_model_source(arch: ArchConfig, text: bool = False) -> str:
    """Returns the source of a standalone ``model.py`` for ``arch`` (``text``: with the text
    functions, for a folder that holds ``text.json``)."""
    model = build_model(arch)
    classes = _classes_used(model)
    sources = [inspect.getsource(cls) for cls in classes]
    modules = {cls.__module__ for cls in classes} | {MaskContext.__module__, cached.__module__}
    helpers = _helpers(sources, modules, skip={c.__name__ for c in classes} | {"ArchConfig", "AttentionConfig"})
    helper_classes = [h for h in helpers if inspect.isclass(h)]
    helper_functions = [h for h in helpers if not inspect.isclass(h)]
    blocks = [inspect.getsource(h) for h in helper_classes + helper_functions] + sources
    config = repr(arch.to_dict())
    header = (
        _docstring(arch, text) + "\n\nfrom __future__ import annotations\n\n"
        "import dataclasses\nimport json\nimport math\nimport os\nimport pathlib\n"
        "from collections.abc import Callable, Hashable\nfrom typing import ClassVar\n\n"
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n"
        f"#: The architecture, as qkvsearch's config.yaml holds it.\nCONFIG = {config}\n\n"
        "ArchConfig = dict  # the models keep CONFIG as their config\n"
        "WeightsSink = Callable[[torch.Tensor], None]  # receives attention weights when set\n"
        "Sublayer = Callable[[torch.Tensor], torch.Tensor]\n"
    )
    source = header + "\n\n" + "\n\n".join(b.rstrip() + "\n" for b in blocks) + "\n\n" + _build_function(arch) + "\n" + _safetensors_reader()
    if text:
        source += text_source(arch)
    return re.sub(r"\n{4,}", "\n\n\n", source)
