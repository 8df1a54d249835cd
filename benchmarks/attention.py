"""Attention layer speed and memory: qkvsearch's layer against minimal hand-written ones.

For each kind of self-attention (plain, causal, causal + rotary, causal + ALiBi) and each
sequence length, it times the forward and backward of
  - qkvsearch's MultiHeadAttention, built from a config (fused path), and
  - a minimal module of about 30 lines doing the same over scaled_dot_product_attention
    (one QKV matmul; rotary angles and the masked ALiBi bias precomputed as buffers),
interleaved (median of repeats), and prints the time ratio ours/minimal with the memory
of each: bytes of the tensors autograd saves for backward, and the peak memory of one
forward+backward (CUDA: peak allocated; CPU: the process's peak resident set, reset
through /proc/self/clear_refs before each measurement). A second table compares the
reference path (explicit softmax, what hands out attention weights) with the fused one.

Run: python benchmarks/attention.py [--seq 128 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from qkvsearch.models import ArchConfig, build_model, set_attention_path
from qkvsearch.models.positions import alibi_slopes

KINDS = {  # kind: (masks, positions) of qkvsearch's config
    "plain": ([], "none"),
    "causal": (["causal"], "none"),
    "rotary": (["causal"], "rotary"),
    "alibi": (["causal"], "alibi"),
}


class MinimalAttention(nn.Module):
    """The smallest multi-head attention over SDPA with the same function as ours."""

    def __init__(self, d_model: int, n_heads: int, kind: str, max_len: int) -> None:
        super().__init__()
        self.n_heads, self.kind = n_heads, kind
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        half = d_model // n_heads // 2
        angle = torch.arange(max_len)[:, None] * 10000.0 ** (-torch.arange(half) / half)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)
        distance = (torch.arange(max_len)[:, None] - torch.arange(max_len)[None, :]).abs()
        bias = -alibi_slopes(n_heads)[:, None, None] * distance
        self.register_buffer("bias", bias.masked_fill(torch.ones_like(distance, dtype=torch.bool).triu(1), -math.inf),
                             persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos[: x.shape[-2]], self.sin[: x.shape[-2]]
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, d_model // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.kind == "rotary":
            q, k = self._rotate(q), self._rotate(k)
        if self.kind == "alibi":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:, :seq, :seq])
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.kind != "plain")
        return self.out(out.transpose(1, 2).reshape(batch, seq, d_model))


def qkv_attention(d_model: int, n_heads: int, kind: str, max_len: int) -> nn.Module:
    masks, positions = KINDS[kind]
    config = ArchConfig.from_dict({
        "kind": "decoder" if masks else "encoder", "vocab_size": 2, "max_seq_len": max_len, "d_model": d_model,
        "positions": positions, ("decoder" if masks else "encoder"): {"n_layers": 1, "attention": {"n_heads": n_heads, "masks": masks}},
    })
    return build_model(config).stack.layers[0].self_attention


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_time(module: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward and backward."""
    sync(x.device)
    start = time.perf_counter()
    module(x).sum().backward()
    sync(x.device)
    return time.perf_counter() - start


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (distinct storages; the
    module's own parameters and buffers excluded, since they exist anyway)."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.sum().backward()
    return sum(seen.values())


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) * 1024


def return_freed_memory() -> None:
    """Makes glibc hand large blocks back to the system when they are freed (a fixed mmap
    threshold instead of one that grows), so the resident set follows the tensors alive."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def peak_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Peak memory of one forward+backward above what was in use before it."""
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        module(x).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as clear:  # resets the peak resident set (VmHWM)
        clear.write("5")
    base = _status("VmRSS")
    module(x).sum().backward()
    return _status("VmHWM") - base


def median_times(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in modules}
    for module in modules.values():  # warm-up (and the caches of ours)
        step_time(module, x)
    for _ in range(repeats):  # interleaved, so drift hits every module alike
        for name, module in modules.items():
            times[name].append(step_time(module, x))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        return_freed_memory()
    max_len = max(args.seq)
    mb = 2.0**20
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, d_model {args.d_model}, "
          f"heads {args.heads}, batch {args.batch}, forward+backward, median of {args.repeats}; memory in MB")
    print(f"{'kind':>7} {'seq':>5} {'ours/minimal':>13} {'saved ours':>11} {'saved min':>10} {'peak ours':>10} {'peak min':>9}")
    print(f"{'':>7} {'':>5} {'(time)':>13} {'(backward)':>11} {'':>10} {'(fwd+bwd)':>10}")
    for kind in args.kinds:
        torch.manual_seed(0)
        ours = qkv_attention(args.d_model, args.heads, kind, max_len).to(device)
        minimal = MinimalAttention(args.d_model, args.heads, kind, max_len).to(device)
        for seq in args.seq:
            x = torch.randn(args.batch, seq, args.d_model, device=device, requires_grad=True)
            median = median_times({"ours": ours, "minimal": minimal}, x, args.repeats)
            print(f"{kind:>7} {seq:>5} {median['ours'] / median['minimal']:>13.3f} "
                  f"{saved_bytes(ours, x) / mb:>11.1f} {saved_bytes(minimal, x) / mb:>10.1f} "
                  f"{peak_bytes(ours, x) / mb:>10.1f} {peak_bytes(minimal, x) / mb:>9.1f}")
    print("\nreference path (explicit softmax; hands out attention weights) against the fused path, causal:")
    print(f"{'seq':>5} {'reference/fused':>16} {'saved ref':>10} {'saved fused':>12}")
    fused = qkv_attention(args.d_model, args.heads, "causal", max_len).to(device)
    reference = qkv_attention(args.d_model, args.heads, "causal", max_len).to(device)
    set_attention_path(reference, "reference")
    for seq in args.seq:
        x = torch.randn(args.batch, seq, args.d_model, device=device, requires_grad=True)
        median = median_times({"fused": fused, "reference": reference}, x, args.repeats)
        print(f"{seq:>5} {median['reference'] / median['fused']:>16.2f} {saved_bytes(reference, x) / mb:>10.1f} "
              f"{saved_bytes(fused, x) / mb:>12.1f}")


if __name__ == "__main__":
    main()
