"""What a trial's hardware can hold and do: a training step's memory, counted from the
architecture before anything is built, the device's free memory, and model FLOP
utilisation against the device's peak."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs: weights, gradients and AdamW's two moments (fp32
    master copies, 16 bytes per parameter), and the activations kept for backward."""

    state: int
    activations: int

    @property
    def total(self) -> int:
        return self.state + self.activations


def estimate_memory(arch: Any, batch_size: int, seq_len: int, precision: str | int = "32-true") -> MemoryEstimate:
    """A training step's memory, counted from the architecture (no build).

    Activations follow the accounting of Korthikanti et al. (2022, "Reducing Activation
    Recomputation in Large Transformer Models", section 4.1) for what this implementation
    keeps per token and layer: both norms' inputs and outputs, the fused QKV output and the
    rotated or normalised q/k, the attention output (the fused kernels keep no
    ``seq x seq`` weights, except where a mask or bias sends attention down the math path on
    a CPU, counted then), the FFN's hidden activations; plus the embeddings and the logits
    with their log-softmax. Half-precision training keeps them in 2 bytes, fp32 in 4.
    """
    from qkvsearch.models import count_parameters

    width = 2 if str(precision).startswith(("bf16", "16")) else 4
    d, tokens = arch.d_model, batch_size * seq_len
    per_token = 2 * d + 2 * arch.vocab_size  # embedding and final norm; logits and log-softmax
    for stack in arch.stacks.values():
        for layer in stack.layers:
            for attention in filter(None, (layer.attention, layer.cross_attention)):
                h, g, d_k, d_v = attention.n_heads, attention.n_kv_heads, attention.d_k, attention.d_v
                per_token += 4 * d + 2 * (h * d_k + g * (d_k + d_v)) + 2 * h * d_v
                plain_causal = [m.name for m in attention.masks] in ([], ["causal"]) and arch.positions.name != "alibi"
                if not plain_causal:  # a boolean mask or bias: the CPU's math path keeps the weights
                    per_token += h * seq_len
            gated = 3 if layer.ffn.name == "swiglu" else 2
            per_token += gated * layer.ffn.d_ff
    return MemoryEstimate(state=16 * count_parameters(arch), activations=tokens * per_token * width)


GiB = 2**30
_UNLIMITED = 1 << 60  # what a cgroup v1 without a limit reports is near 2**63


def _read_int(path: pathlib.Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    return None


def cgroup_limits(proc_cgroup: pathlib.Path = pathlib.Path("/proc/self/cgroup"),
                  root: pathlib.Path = pathlib.Path("/sys/fs/cgroup")) -> list[tuple[int, str]]:
    """What the process's memory cgroups (v2, and v1's memory controller; the cgroup and its
    ancestors) leave it: ``(bytes free, which limit)`` for each that is set."""
    found = []
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            v2 = controllers == ""
            if not v2 and "memory" not in controllers.split(","):
                continue
            base = root / "unified" if v2 and (root / "unified" / "cgroup.controllers").exists() else root
            folder = (base if v2 else root / "memory") / path.lstrip("/")
            for directory in [folder, *folder.parents]:
                if not directory.is_relative_to(base if v2 else root / "memory"):
                    break
                limit_file, usage_file = (("memory.max", "memory.current") if v2
                                          else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
                limit, usage = _read_int(directory / limit_file), _read_int(directory / usage_file)
                if limit is not None and limit < _UNLIMITED:
                    found.append((max(0, limit - (usage or 0)), f"the cgroup {directory} ({limit_file} "
                                  f"{limit / GiB:.2f} GiB, {(usage or 0) / GiB:.2f} used)"))
    return found


def address_space_limit(status: pathlib.Path = pathlib.Path("/proc/self/status")) -> tuple[int, str] | None:
    """What ``ulimit -v`` (RLIMIT_AS) leaves the process, or None without a limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    size = 0
    with contextlib.suppress(OSError, StopIteration, ValueError):
        size = int(next(line for line in status.read_text().splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
    return max(0, soft - size), f"ulimit -v (RLIMIT_AS {soft / GiB:.2f} GiB, {size / GiB:.2f} mapped)"


def free_memory(device: str, limit_gb: float | None = None) -> tuple[int, str]:
    """Bytes a trial may still take on ``device`` ("cuda", "cpu"...), and which limit says so:
    the GPU's free memory; for a CPU the tightest of the machine's available memory, the
    process's memory cgroups and ``ulimit -v``; ``limit_gb`` caps either (``memory_limit_gb``)."""
    known: list[tuple[int, str]] = []
    if device.startswith("cuda"):
        import torch

        known.append((torch.cuda.mem_get_info()[0], "the GPU"))
    else:
        with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as meminfo:
            available = int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]) * 1024
            known.append((available, "the machine"))
        known += cgroup_limits()
        if (limit := address_space_limit()) is not None:
            known.append(limit)
    if limit_gb is not None:
        known.append((int(limit_gb * GiB), f"memory_limit_gb={limit_gb:g}"))
    return min(known, default=(2**62, "nothing"))


#: Dense bf16 tensor-core peaks in TFLOP/s, without sparsity, from NVIDIA's data sheets
#: (A100: "NVIDIA A100 Tensor Core GPU" datasheet; H100/H200: the H100 and H200 datasheets,
#: SXM and PCIe/NVL forms; L4, L40S, A10: their product datasheets; RTX 4090: the Ada
#: architecture whitepaper, appendix A, FP32 accumulate). Matched against
#: ``torch.cuda.get_device_name()`` in order, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2),
)


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The device's dense bf16 peak (``override`` wins); None for a device not in the table."""
    if override is not None:
        return float(override)
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def model_flops_utilisation(flops_per_token: int, tokens_per_s: float, peak: float | None) -> float | None:
    """Training FLOPs achieved over the peak: forward FLOPs per token x 3 (the backward pass
    costs twice the forward) x tokens per second, against ``peak`` TFLOP/s."""
    if not peak:
        return None
    return 3 * flops_per_token * tokens_per_s / (peak * 1e12)
