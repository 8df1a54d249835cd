"""The Hydra apps of the qkv command line: sweep, train, export, report, dashboard, space."""
