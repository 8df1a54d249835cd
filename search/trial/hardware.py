"""What a trial's hardware can hold and do: a training step's memory, counted from the
architecture before anything is built, the device's free memory, and model FLOP
utilisation against the device's peak."""

from __future__ import annotations

import contextlib
import dataclasses
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


def free_memory(device: str, limit_gb: float | None = None) -> int:
    """Bytes free on ``device`` ("cuda", "cpu"...): the GPU's free memory, or the machine's
    available memory for a CPU; ``limit_gb`` caps it (a GPU shared with others)."""
    free = None
    if device.startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as meminfo:
            free = int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]) * 1024
    known = [b for b in (free, None if limit_gb is None else int(limit_gb * 2**30)) if b is not None]
    return min(known) if known else 2**62


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
