"""Lightning imported through qkvsearch leaves out what torchmetrics would pull in, and only that."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _python(code: str, tmp_path=None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, **env, "PYTHONPATH": str(tmp_path or "")})


def test_a_worker_imports_lightning_without_transformers_or_scipy_signal_and_both_still_import_whole():
    pytest.importorskip("transformers")
    result = _python("""
        import sys
        import qkvsearch.search.study.sweep  # a worker's imports: Lightning, torchmetrics, the trial loop
        import lightning.pytorch, torchmetrics
        assert "torchmetrics" in sys.modules and "lightning.pytorch" in sys.modules
        assert "transformers" not in sys.modules and "scipy.signal" not in sys.modules, "spared modules imported"
        import scipy.signal, transformers  # what comes after gets the real modules
        assert [round(float(v), 6) for v in scipy.signal.windows.hamming(3)] == [0.08, 1.0, 0.08]
        assert transformers.AutoModel.__module__.startswith("transformers.models.auto")
        from scipy import stats
        assert round(stats.spearmanr([1, 2, 3], [1, 3, 2]).statistic, 2) == 0.5
        import torch
        metric = torchmetrics.MeanMetric()  # torchmetrics itself works: Lightning logs these
        metric.update(torch.tensor([1.0, 3.0]))
        assert float(metric.compute()) == 2.0
        try:
            torchmetrics.functional.text.bert_score(["a"], ["a"])
        except ImportError as error:
            assert "QKV_FULL_IMPORTS=1" in str(error)
        else:
            raise AssertionError("BERTScore ran on a placeholder")
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def test_qkv_full_imports_turns_it_off():
    pytest.importorskip("transformers")
    result = _python("""
        import sys
        import qkvsearch.search.study.sweep
        assert "transformers" in sys.modules and "scipy.signal" in sys.modules
    """, QKV_FULL_IMPORTS="1")
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_target_that_needs_more_than_a_placeholder_is_imported_whole(tmp_path):
    """A later torchmetrics that imports a submodule of what is spared: the lean attempt is
    undone (its half-imported submodules too) and the module imports as it would have."""
    package = tmp_path / "needy"
    package.mkdir()
    (package / "__init__.py").write_text("from needy import part\nfrom json.decoder import JSONDecoder\n")
    (package / "part.py").write_text("import json\nLOADED = json.loads('[1]')\n")
    result = _python("""
        import sys
        from qkvsearch.search.base.lean_imports import LeanFinder
        sys.meta_path.insert(0, LeanFinder("needy", ("json",)))
        sys.modules.pop("json", None); sys.modules.pop("json.decoder", None)
        import needy
        assert needy.part.LOADED == [1] and needy.JSONDecoder.__module__ == "json.decoder"
        assert sys.modules["json"].loads("2") == 2  # the real module, not the placeholder
        assert not [f for f in sys.meta_path if getattr(f, "target", None) == "needy"]  # one import, then gone
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
