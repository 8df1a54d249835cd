"""Does task=text's data path keep up with training? Side by side in one run:

- the loader: batches/s of random windows read from the memory-mapped train tokens;
- training: steps/s of a small decoder (3 layers x 64, the tiny space's largest) on the
  same batches, forward + backward + AdamW.

Prints both and their ratio (loader over training: above 1, the loader is never what a
trial waits for; each step reads one batch). Also the one-off tokenizing rate and the
time the second setup takes (the cache reused).

Run: python benchmarks/data.py [--mb 20] [--seq 256] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np
import torch

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but all "
         "attention query key value head layer model token sequence").split()


def write_corpus(root: pathlib.Path, megabytes: float) -> None:
    rng = np.random.default_rng(0)
    per_file = 200_000
    for i in range(max(1, int(megabytes * 1e6 / per_file))):
        words = rng.choice(WORDS, size=per_file // 5)
        (root / f"doc{i:04d}.txt").write_text(" ".join(words))


def rate(fn, seconds: float = 3.0) -> float:
    fn()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from qkvsearch.models import ArchConfig, build_model
    from qkvsearch.tasks import TextCorpus

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / "corpus").mkdir()
        write_corpus(root / "corpus", args.mb)
        make = lambda: TextCorpus(paths=[f"{tmp}/corpus/*.txt"], seq_len=args.seq, batch_size=args.batch,  # noqa: E731
                                  cache_dir=f"{tmp}/cache")
        start = time.perf_counter()
        task = make()
        task.setup("fit")
        first = time.perf_counter() - start
        start = time.perf_counter()
        make().setup("fit")
        second = time.perf_counter() - start
        tokens = sum(len(t) for t in task.tokens.values())
        print(f"tokenizing {tokens / 1e6:.1f} M byte tokens: {first:.2f} s ({tokens / first / 1e6:.1f} M tokens/s); "
              f"the second setup (cache reused): {second * 1000:.0f} ms")
        batches = iter(task.train_dataloader())

        def next_batch():
            nonlocal batches
            try:
                return next(batches)
            except StopIteration:
                batches = iter(task.train_dataloader())
                return next(batches)

        loader = rate(next_batch)
        arch = ArchConfig.from_dict({"kind": "decoder", "vocab_size": task.vocab_size, "max_seq_len": args.seq,
                                     "d_model": 64, "positions": "rotary",
                                     "decoder": {"n_layers": 3, "attention": {"n_heads": 4, "masks": ["causal"]}}})
        model = build_model(arch)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        batch = next_batch()

        def step():
            logits = model(batch["tokens"])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train = rate(step)
        print(f"loader {loader:,.0f} batches/s vs training {train:,.1f} steps/s (3 x 64 decoder, batch {args.batch} x "
              f"{args.seq}, {args.threads} thread): the loader is {loader / train:,.0f}x faster than training needs")


if __name__ == "__main__":
    main()
