"""Attention layer speed and memory: qkvsearch's layer against a minimal hand-written one.

Prints, for several sequence lengths, the forward+backward time of
  - the default MultiHeadAttention (sqrt(d_k) scaling, no mask, no positions; fused path),
  - a minimal multi-head attention written directly over scaled_dot_product_attention,
  - the same qkvsearch layer on its reference path (explicit softmax),
as ratios measured side by side in one run (interleaved, median of repeats), and the
memory each path keeps for backward (bytes of tensors saved by autograd). With a CUDA
device it also prints peak allocated memory. Run: python benchmarks/attention.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from qkvsearch.models import ArchConfig, build_model, set_attention_path


class MinimalAttention(nn.Module):
    """The smallest multi-head attention over SDPA: one fused QKV projection, one output."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, d_model // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).reshape(batch, seq, d_model))


def qkv_attention(d_model: int, n_heads: int) -> nn.Module:
    config = ArchConfig.from_dict({
        "kind": "encoder", "vocab_size": 2, "max_seq_len": 8, "d_model": d_model,
        "encoder": {"n_layers": 1, "attention": {"n_heads": n_heads}},
    })
    return build_model(config).stack.layers[0].self_attention


def step_time(module: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward and backward."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    module(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.sum().backward()
    return sum(seen.values())


def peak_cuda_bytes(module: nn.Module, x: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = qkv_attention(args.d_model, args.heads).to(device)
    reference = qkv_attention(args.d_model, args.heads).to(device)
    set_attention_path(reference, "reference")
    minimal = MinimalAttention(args.d_model, args.heads).to(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"d_model {args.d_model}, heads {args.heads}, batch {args.batch}, forward+backward, median of {args.repeats}")
    print(f"{'seq':>6} {'ours/minimal':>13} {'reference/fused':>16} {'saved MB fused':>15} {'saved MB ref':>13} {'saved ref/fused':>16}")
    for seq in args.seq:
        x = torch.randn(args.batch, seq, args.d_model, device=device, requires_grad=True)
        modules = {"ours": ours, "minimal": minimal, "reference": reference}
        times: dict[str, list[float]] = {name: [] for name in modules}
        for module in modules.values():  # warm-up
            step_time(module, x)
        for _ in range(args.repeats):  # interleaved, so drift hits every module alike
            for name, module in modules.items():
                times[name].append(step_time(module, x))
        median = {name: statistics.median(t) for name, t in times.items()}
        fused_mem, ref_mem = saved_bytes(ours, x), saved_bytes(reference, x)
        print(f"{seq:>6} {median['ours'] / median['minimal']:>13.3f} {median['reference'] / median['ours']:>16.2f} "
              f"{fused_mem / 2**20:>15.1f} {ref_mem / 2**20:>13.1f} {ref_mem / fused_mem:>16.2f}")
        if device.type == "cuda":
            print(f"{'':>6} peak CUDA MB: fused {peak_cuda_bytes(ours, x) / 2**20:.1f}, reference {peak_cuda_bytes(reference, x) / 2**20:.1f}")


if __name__ == "__main__":
    main()
