"""A corpus larger than the memory a process may allocate still tokenizes and trains:
the token splits are written a document at a time and memory-mapped, never read whole."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.tasks.test_corpus import WORDS

MB = 1 << 20
ROOT = pathlib.Path(__file__).resolve().parents[2]

CAPPED = r"""
import json, re, resource, sys
import numpy as np
import torch, lightning
from qkvsearch.search.study.sweep import sweep
from tests.conftest import compose_conf

root, headroom = sys.argv[1], int(sys.argv[2])
import scipy.linalg
# the BLAS libraries allocate their work buffers on first use: before the cap, not against it.
# numpy's LAPACK takes a 32 MB OpenBLAS buffer of its own (matplotlib inverts a matrix when a trial
# renders its attention); past the cap OpenBLAS exits the process instead of raising
np.ones((64, 64)) @ np.ones((64, 64)); np.linalg.inv(np.eye(64)); scipy.linalg.lu(np.eye(64))
torch.ones(64, 64) @ torch.ones(64, 64)
data = int(re.search(r"VmData:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
# anonymous and private writable memory (what reading a file into RAM takes) is capped;
# a read-only shared file mapping is not counted
resource.setrlimit(resource.RLIMIT_DATA, (data + headroom, data + headroom))
cfg = compose_conf("sweep", ["task=text", f"task.data.paths=[{root}/corpus/*.txt]", "task.data.seq_len=64",
                             "task.data.val_fraction=0.1", "task.data.test_fraction=0.1", "task.data.val_batches=2",
                             "trainer.max_steps=10", "trainer.val_check_interval=5", "trainer.limit_val_batches=2",
                             f"run_root={root}", "n_trials=1", "pruner=none", "workers=1"])
study = sweep(cfg)
(folder,) = (p for p in __import__("pathlib").Path(root, "cache").iterdir())
try:
    np.fromfile(folder / "train.bin", dtype=np.uint16)
    read_whole = "fit"
except MemoryError:
    read_whole = "MemoryError"
print(json.dumps({"states": [t.state.name for t in study.trials], "train_bytes": (folder / "train.bin").stat().st_size,
                  "read_whole": read_whole}))
"""


@pytest.mark.slow
def test_a_corpus_larger_than_the_memory_cap_trains(tmp_path):
    rng = np.random.default_rng(0)
    base = " ".join(rng.choice(WORDS, size=2 * MB // 5))
    (tmp_path / "corpus").mkdir()
    for i in range(48):  # 96 MB of text: 192 MB of uint16 tokens
        (tmp_path / "corpus" / f"doc{i:02d}.txt").write_text(f"document {i}: " + base)
    headroom = 96 * MB  # what the process may allocate beyond its imports
    # what counts against the cap beside the data: OpenBLAS sizes its buffers by its thread count,
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "MALLOC_ARENA_MAX": "2"}  # and glibc reserves 64 MB of arena per thread otherwise
    result = subprocess.run([sys.executable, "-c", CAPPED, str(tmp_path), str(headroom)], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)  # where tests.conftest imports from
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["states"] == ["COMPLETE"]
    assert report["train_bytes"] > headroom * 1.4  # the train split alone is well over the cap
    assert report["read_whole"] == "MemoryError"  # the cap bites: reading the split into memory fails
