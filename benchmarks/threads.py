"""Threads per worker: the default sweep's train step with 1 or 2 intra-op threads, on a
quiet machine and beside one other busy 2-thread process, measured side by side.

Each setting runs in a fresh process (thread settings are fixed at start-up); the settings
alternate (ABBA) and the median ms/step of each is printed with its slowdown under load.

    python benchmarks/threads.py [--steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

STEP = r"""
import os, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from qkvsearch.models import ArchConfig, build_model
arch = ArchConfig.from_dict({"kind": "decoder", "vocab_size": 128, "max_seq_len": 64, "d_model": 64,
    "positions": "rotary", "decoder": {"n_layers": 3, "attention": {"n_heads": 4, "masks": ["causal"]},
    "ffn": {"name": "swiglu"}}})
model = build_model(arch)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, 128, (32, 65))
times = []
for i in range(int(sys.argv[2]) + 10):
    start = time.perf_counter()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), tokens[:, 1:].reshape(-1))
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    if i >= 10:
        times.append(time.perf_counter() - start)
print(statistics.median(times) * 1000)
"""
LOAD = "import torch, time\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nend = time.time() + 600\nwhile time.time() < end:\n    a @ a\n"


def step_ms(threads: int, steps: int, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(steps)], capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[tuple[str, int, str], list[float]] = {}
    for load in ("quiet", "loaded"):
        competitor = subprocess.Popen([sys.executable, "-c", LOAD]) if load == "loaded" else None
        time.sleep(1.0 if competitor else 0.0)
        try:
            for r in range(args.rounds):
                order = [1, 2] if r % 2 == 0 else [2, 1]
                for threads in order:
                    for policy in ("ACTIVE", "PASSIVE"):
                        env = {**os.environ, "OMP_WAIT_POLICY": policy}
                        results.setdefault((load, threads, policy), []).append(step_ms(threads, args.steps, env))
        finally:
            if competitor:
                competitor.kill()
    print(f"{'threads':>7} {'OMP_WAIT_POLICY':>15} {'quiet ms/step':>14} {'loaded ms/step':>15} {'slowdown':>9}")
    for threads in (1, 2):
        for policy in ("ACTIVE", "PASSIVE"):
            quiet = statistics.median(results[("quiet", threads, policy)])
            loaded = statistics.median(results[("loaded", threads, policy)])
            print(f"{threads:>7} {policy:>15} {quiet:14.1f} {loaded:15.1f} {loaded / quiet:8.1f}x")
    one = statistics.median(results[("quiet", 1, "PASSIVE")])
    two = statistics.median(results[("quiet", 2, "PASSIVE")])
    print(f"quiet machine, 2 threads vs 1 (PASSIVE): {one / two:.2f}x the speed")


if __name__ == "__main__":
    main()
