"""The base of ``search/``: what every layer above may use and nothing below it needs.

``settings`` (the sweep's cheap checks, objectives, the trial loop's settings), ``keys``
(the names of trial and study attributes), ``errors``, ``signals`` (where Ctrl-C and a
scheduler's SIGTERM may stop a command), ``env`` (environment variables and flags shared
between processes), ``configs`` (Hydra composition and plugins) and ``version``.
"""
