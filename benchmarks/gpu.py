"""On a CUDA GPU: a GPT-2-small shaped trial's speed and MFU, eager and compiled, and the
fused against the reference attention path at sequence 2048.

1. A decoder of GPT-2 small's shape (12 layers, d_model 768, 12 heads, GELU 3072, learned
   positions, pre-LayerNorm, tied embeddings, vocabulary 50304, sequence 1024) trains as a
   sweep trial does (the trial loop of search/trial/loop.py on Lightning Fabric, bf16-mixed, fused
   AdamW, random tokens), eager and with compile; prints tokens/s and model FLOP utilisation
   against the device's dense bf16 peak (search/study/devices.py's table, or --peak-tflops).
   The same with ``compile_mode=reduce-overhead`` (the step captured in CUDA graphs).
2. One attention layer (d_model 1024, 16 heads, causal, batch 4, seq 2048, bf16): forward +
   backward time and peak memory of the fused path against the reference path.
3. ``--packing``: trials per hour of real ``qkv sweep``s of the ``tiny`` and ``decoder``
   spaces with k = 1, 2, 4, 8, 16 workers on GPU 0 (``trials_per_gpu=k``), the speed-up
   over k = 1, and what ``trials_per_gpu=auto`` would choose there.

Without CUDA it says so and exits 0. Run: python benchmarks/gpu.py [--steps 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


class RandomTokens:
    """A language-model task of random tokens (speed only), in the task contract."""

    kind, n_classes = "language_model", None

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int) -> None:
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.data = torch.randint(0, vocab_size, (64, batch_size, seq_len + 1))

    def setup(self, stage: str) -> None:
        pass

    def _batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        return [{"tokens": b[:, :-1], "targets": b[:, 1:]} for b in self.data[:n]]

    def train_dataloader(self) -> list[dict[str, torch.Tensor]]:
        return self._batches(len(self.data))

    def val_dataloader(self) -> list[dict[str, torch.Tensor]]:
        return self._batches(2)


def gpt2_trial(steps: int, batch: int) -> tuple:
    """A GPT-2-small shaped decoder's trial: architecture, random-token task, module, loop settings."""
    from qkvsearch.models import ArchConfig
    from qkvsearch.search.base.settings import LoopSettings
    from qkvsearch.search.trial.lit import LitTransformer

    arch = ArchConfig.from_dict({
        "kind": "decoder", "vocab_size": 50304, "max_seq_len": 1024, "d_model": 768, "positions": "learned",
        "norm": "layernorm", "tie_embeddings": True,
        "decoder": {"n_layers": 12, "attention": {"n_heads": 12, "masks": ["causal"]}, "ffn": {"name": "gelu"}},
    })
    task = RandomTokens(arch.vocab_size, 1024, batch)
    lit = LitTransformer(arch, task.kind, max_steps=steps)
    settings = LoopSettings(max_steps=steps, val_check_interval=steps, limit_val_batches=1, gradient_clip_val=1.0,
                            log_every_n_steps=10, accelerator="gpu", devices=1, precision="bf16-mixed")
    return arch, task, lit, settings


def trial_speed(steps: int, batch: int, compile_backend: str | None, peak: float | None,
                compile_mode: str | None = None) -> tuple[float, float | None, str]:
    from qkvsearch.models import flops_per_token
    from qkvsearch.search.trial.hardware import model_flops_utilisation, peak_tflops
    from qkvsearch.search.trial.loop import fit

    arch, task, lit, settings = gpt2_trial(steps, batch)
    warm = fit(lit, task, dataclasses.replace(settings, max_steps=5, val_check_interval=5), [],
               compile_backend=compile_backend, compile_mode=compile_mode)  # compilation and allocator warm-up
    result = fit(lit, task, settings, [], compile_backend=compile_backend, compile_mode=compile_mode)
    tokens_per_s = result.tokens / result.train_seconds
    mfu = model_flops_utilisation(flops_per_token(arch), tokens_per_s, peak_tflops(result.device_name, peak))
    note = "compiled" if result.compiled else f"eager ({result.compile_fallback or warm.compile_fallback or 'as asked'})"
    return tokens_per_s, mfu, f"{result.device_name}, {note}, peak {result.peak_memory_bytes / 2**30:.1f} GiB"


def profile_trial(steps: int, batch: int) -> None:
    """Where an eager GPT-2-small trial step's time goes: the top kernels and CPU calls."""
    from torch.profiler import ProfilerActivity, profile

    from qkvsearch.search.trial.loop import fit

    arch, task, lit, settings = gpt2_trial(steps, batch)
    fit(lit, task, dataclasses.replace(settings, max_steps=3, val_check_interval=3), [])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fit(lit, task, settings, [])
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def attention_paths(repeats: int) -> None:
    from qkvsearch.models import ArchConfig, build_model, set_attention_path

    config = ArchConfig.from_dict({"kind": "decoder", "vocab_size": 2, "max_seq_len": 2048, "d_model": 1024,
                                   "decoder": {"n_layers": 1, "attention": {"n_heads": 16, "masks": ["causal"]}}})
    layer = build_model(config).stack.layers[0].self_attention.cuda().to(torch.bfloat16)
    x = torch.randn(4, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for path in ("fused", "reference"):
        set_attention_path(layer, path)
        layer(x).sum().backward()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x).sum().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[path] = (statistics.median(times), torch.cuda.max_memory_allocated() - base)
    (fused_s, fused_b), (ref_s, ref_b) = results["fused"], results["reference"]
    print(f"attention at seq 2048 (batch 4, d_model 1024, 16 heads, causal, bf16, forward+backward): fused "
          f"{fused_s * 1000:.2f} ms / {fused_b / 2**20:.0f} MB, reference {ref_s * 1000:.2f} ms / {ref_b / 2**20:.0f} MB: "
          f"fused is {ref_s / fused_s:.1f}x faster with {ref_b / max(fused_b, 1):.1f}x less peak memory (goal >= 4x, >= 10x)")


def packing(ks: list[int], trials: int) -> None:
    """Trials per hour with k workers sharing GPU 0, per space, each a real sweep."""
    from qkvsearch.search.base.configs import compose_config
    from qkvsearch.search.study.devices import largest_trial_memory, plan_workers

    for space, task in (("tiny", "lm_stdlib"), ("decoder", "recall")):
        auto = plan_workers(compose_config("sweep", [f"space={space}", f"task={task}", "trainer=gpu", "gpus=[0]",
                                                     "workers=auto", "trials_per_gpu=auto"]))
        need = largest_trial_memory(compose_config("sweep", [f"space={space}", f"task={task}", "trainer=gpu"]))
        print(f"{space}: trials_per_gpu=auto chooses {auto.workers} on GPU 0 (largest trial ~{(need or 0) / 2**30:.2f} GiB)")
        base = None
        for k in ks:
            with tempfile.TemporaryDirectory() as root:
                command = [sys.executable, "-m", "qkvsearch.search.cli", "sweep", f"space={space}", f"task={task}",
                           "trainer=gpu", "gpus=[0]", f"workers={k}", f"trials_per_gpu={k}", f"n_trials={max(trials, 2 * k)}",
                           "finalists=0", "baseline=false", "pruner=none", f"run_root={root}", "artifacts=null"]
                began = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                wall = time.perf_counter() - began
                if done.returncode != 0:
                    print(f"  k={k}: failed ({done.stderr.strip().splitlines()[-1:] or ['?']})")
                    continue
                n = max(trials, 2 * k)
                per_hour = n / wall * 3600
                base = base or per_hour
                print(f"  k={k:2d}: {n} trials in {wall:6.1f} s, {per_hour:7.0f} trials/hour, {per_hour / base:.2f}x k=1",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="only profile an eager trial's steps")
    parser.add_argument("--packing", action="store_true", help="only trials per hour against workers per GPU")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--packing-trials", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    from qkvsearch.search.trial.lit import quiet_lightning

    quiet_lightning()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    if args.profile:
        profile_trial(args.steps, args.batch)
        return
    if args.packing:
        packing(args.ks, args.packing_trials)
        return
    for backend, mode, name in ((None, None, "eager"), ("inductor", None, "compile"),
                                ("inductor", "reduce-overhead", "compile, CUDA graphs")):
        tokens_per_s, mfu, note = trial_speed(args.steps, args.batch, backend, args.peak_tflops, mode)
        share = f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU unknown (give --peak-tflops)"
        print(f"GPT-2-small trial, batch {args.batch} x 1024, {name}: "
              f"{tokens_per_s:,.0f} tokens/s, {share} (goal >= 45% on an H200); {note}")
    attention_paths(args.repeats)


if __name__ == "__main__":
    main()
