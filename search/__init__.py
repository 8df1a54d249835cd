"""The sweep, in layers that import one way only (import-linter contracts in pyproject.toml):

    cli -> commands -> study -> trial -> (inspect | export) -> base

- ``cli``, ``cli_conf``: the ``qkv`` entry point, and help and suggestions read from the YAML;
- ``commands``: the Hydra apps (sweep, train, export, report, dashboard, space);
- ``study``: storage and locks, workers and their group, devices, the sweep's stages
  (``prepare``, ``search``, ``finalists``; ``sweep`` runs them), warm start, replay;
- ``trial``: the objective, its backends (Fabric), the trial loop and its callbacks,
  duplicates, multi-device ranks, hardware figures, test scores;
- ``inspect``: reading a study back: selection, finalists, proxy trust, artifacts, summary;
- ``export``: one module per export format behind one interface;
- ``base``: settings, attribute keys, errors, signals, shared process facts, configs, weights.

Below ``search`` sit ``tasks -> spaces -> models``.
"""

from qkvsearch.search.base.lean_imports import install as _lean_imports

_lean_imports()  # Lightning's torchmetrics without scipy.signal and transformers (base/lean_imports.py)
