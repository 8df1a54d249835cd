"""A decoder training step: qkvsearch's model against a nanoGPT-style model of ~60 lines.

Both have the default sweep's size (3 layers, d_model 64, 4 heads, GELU MLP of 256, learned
positions, pre-LayerNorm, tied embeddings, no projection biases; sequence 64, batch 32)
and the same parameter count (checked). A step is forward, cross-entropy, backward and
an AdamW step. Steps alternate between the two models (ABBA blocks) and the medians of
wall and CPU time are compared: ours/nanoGPT, 1.0 means no cost of being configurable.

Run: python benchmarks/decoder_step.py [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from qkvsearch.models import ArchConfig, build_model


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, seq, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def ours(vocab: int, seq: int, d: int, heads: int, layers: int) -> nn.Module:
    return build_model(ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": vocab, "max_seq_len": seq, "d_model": d, "positions": "learned",
        "norm": "layernorm", "norm_placement": "pre", "tie_embeddings": True,
        "decoder": {"n_layers": layers, "attention": {"n_heads": heads, "masks": ["causal"]},
                    "ffn": {"name": "gelu", "d_ff": 4 * d, "bias": False}},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block", type=int, default=10, help="steps of one model before switching")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seq, d, heads, layers, batch = 64, 64, 4, 3, 32
    torch.manual_seed(0)
    models = {"ours": ours(args.vocab, seq, d, heads, layers), "nanogpt": NanoGPT(args.vocab, seq, d, heads, layers)}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts["ours"] == counts["nanogpt"], counts
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    data = torch.randint(0, args.vocab, (batch, seq + 1))
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}

    def step(name: str) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = models[name](data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), data[:, 1:].reshape(-1))
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        wall[name].append(time.perf_counter() - start)
        cpu[name].append(time.process_time() - start_cpu)

    for name in models:  # warm-up
        for _ in range(5):
            step(name)
        wall[name].clear()
        cpu[name].clear()
    for i in range(args.steps // args.block):
        for name in (("ours", "nanogpt") if i % 2 == 0 else ("nanogpt", "ours")):
            for _ in range(args.block):
                step(name)
    ratio_wall = statistics.median(wall["ours"]) / statistics.median(wall["nanogpt"])
    ratio_cpu = statistics.median(cpu["ours"]) / statistics.median(cpu["nanogpt"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), {counts['ours']:,} parameters each, "
          f"batch {batch} x seq {seq}: ours {statistics.median(wall['ours']) * 1000:.1f} ms/step, "
          f"nanoGPT-style {statistics.median(wall['nanogpt']) * 1000:.1f} ms/step")
    print(f"ours/nanoGPT: {ratio_wall:.3f}x by wall time, {ratio_cpu:.3f}x by CPU time (median of {args.steps}; goal <= 1.03x)")


if __name__ == "__main__":
    main()
