"""The commands that read a whole study, timed on a study that ``coordination.py`` filled
(its ``--inspect``): the end-of-sweep summary, ``qkv report`` (its page's size too) and
optuna-dashboard's study page, as ``qkv dashboard`` serves it and as the bare app did
(first, again within its 10 s cache, past it, and as a browser refreshes it).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import optuna

from qkvsearch.search.base.configs import compose_config
from qkvsearch.search.study.storage import open_storage


def inspect(overrides: list[str]) -> dict[str, Any]:
    """Times the commands that read the whole study (each in a fresh process's state)."""
    from rich.console import Console

    from qkvsearch.search.commands.report import render
    from qkvsearch.search.inspect.report_text import print_summary

    cfg = compose_config("sweep", overrides)
    out: dict[str, Any] = {}
    storage = open_storage(cfg.storage)
    study = optuna.load_study(study_name=str(cfg.study_name), storage=storage)
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        print_summary(study, [], Console(file=devnull))
    out["summary_s"] = time.perf_counter() - start
    study = optuna.load_study(study_name=str(cfg.study_name), storage=open_storage(cfg.storage))  # a cold cache
    start = time.perf_counter()
    page = render(study, None, str(cfg.run_root))
    out["report_s"], out["report_mb"] = time.perf_counter() - start, len(page.encode()) / 2**20
    import wsgiref.util

    import optuna_dashboard

    from qkvsearch.search.commands.dashboard import dashboard_app

    def page(app: Any, after: int = 0) -> tuple[float, bytes]:
        environ: dict[str, Any] = {"PATH_INFO": f"/api/studies/{study._study_id}", "REQUEST_METHOD": "GET",
                                   "QUERY_STRING": f"after={after}"}
        wsgiref.util.setup_testing_defaults(environ)
        start = time.perf_counter()
        body = b"".join(app(environ, lambda status, headers, exc_info=None: None))
        return time.perf_counter() - start, body

    start = time.perf_counter()  # qkv dashboard before 7 December: the summaries, then the storage as opened
    bare = optuna_dashboard.wsgi(open_storage(cfg.storage))
    optuna.get_all_study_summaries(open_storage(cfg.storage))
    out["dashboard_bare_start_s"] = time.perf_counter() - start
    out["dashboard_bare_first_s"] = page(bare)[0]
    start = time.perf_counter()
    ours, warming = dashboard_app(open_storage(cfg.storage))
    out["dashboard_start_s"] = time.perf_counter() - start  # what it does before the URL is printed
    warming.join()
    out["dashboard_warm_s"] = time.perf_counter() - start  # and the read of the latest studies behind it
    out["dashboard_first_s"], body = page(ours)
    out["dashboard_again_s"] = page(ours)[0]  # within optuna-dashboard's own 10 s cache of the trials
    time.sleep(11)  # past it: a page refreshed while a sweep runs reads the storage again
    out["dashboard_refresh_s"] = page(ours)[0]
    out["dashboard_bare_refresh_s"] = page(bare)[0]
    time.sleep(11)  # as a browser refreshes: it asks only for the trials after those it shows
    out["dashboard_browser_refresh_s"] = page(ours, len(json.loads(body)["trials"]))[0]
    out["dashboard_mb"] = len(body) / 2**20
    return out
