"""The sweep, grouped by concern; imports flow one way, commands -> study -> trial -> models:

- ``commands``: the Hydra apps of ``qkv`` (sweep, train, export, report, dashboard, space);
- ``study``: storage and locks, worker processes, devices, retries, settings, live progress;
- ``trial``: the objective, the LightningModule, the trial loop (Fabric) and its callbacks;
- ``inspect``: artifacts, trial selection, the text summary;
- ``export``: standalone code for an architecture.

``cli`` (the ``qkv`` entry point), ``cli_conf`` (help and suggestions from the YAML),
``configs`` (Hydra composition) and ``errors`` serve them all.
"""
