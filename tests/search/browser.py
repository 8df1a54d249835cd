"""Headless Chromium (Debian's package) for tests that look at rendered pages."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("QKV_REQUIRE_SERVICES"):
            pytest.fail("QKV_REQUIRE_SERVICES is set but chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def rendered_dom(url: str, budget_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran (``--dump-dom`` with a virtual time budget)."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             "--window-size=1300,2000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )
    if result.returncode:
        raise RuntimeError(f"chromium failed on {url}: {result.stderr[-2000:]}")
    return result.stdout


def screenshot(url: str, path, budget_ms: int = 15000, size: str = "1300,2400") -> object:
    """A PNG of the rendered page at ``path``; returns it as a PIL image."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             f"--window-size={size}", f"--screenshot={path}", "--hide-scrollbars", url],
            capture_output=True, text=True, timeout=120,
        )
    if result.returncode or not os.path.exists(path):
        raise RuntimeError(f"chromium could not screenshot {url}: {result.stderr[-2000:]}")
    return Image.open(path)


def is_blank(image) -> bool:
    """True when a screenshot is (nearly) one colour: nothing was drawn."""
    colours = image.convert("L").getextrema()
    return colours[1] - colours[0] < 30
