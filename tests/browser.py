"""Headless Chromium for tests of web pages: Debian's /usr/bin/chromium
driven by Playwright (never a downloaded browser).

    from browser import CHROMIUM, chromium_page, needs_chromium

    @needs_chromium
    def test_page(...):
        with chromium_page() as page:
            page.goto(url)
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest

CHROMIUM = os.environ.get("AESFORMER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright; no browser download needed)"
    return None


needs_chromium = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@contextlib.contextmanager
def chromium_page(viewport=(1280, 900), timeout_ms: int = 120_000) -> Iterator["object"]:
    """A fresh page in a headless Chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()
