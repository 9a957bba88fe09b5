"""Regenerate the README's screenshots: the demo with the shipped weights, in Debian Chromium.

    python docs/screenshots.py            # docs/screenshot.png, screenshot_reconstruct.png, screenshot_anomaly.png
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import app  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    settings = app.Settings(offline=True, host="127.0.0.1", port=free_port())
    blocks, url = app.launch(settings, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            gallery = page.locator("#browse-gallery")
            gallery.locator("img").first.wait_for()
            gallery.locator("button").filter(has=page.locator("img")).nth(5).click()
            page.locator("#metrics").get_by_text("PSNR").wait_for()
            page.locator("#recon img").wait_for()
            page.screenshot(path=str(ROOT / "docs/screenshot_reconstruct.png"))
            page.get_by_role("tab", name="Generate").click()
            page.get_by_role("button", name="Generate", exact=True).click()
            page.locator("#generate-status").get_by_text("Done").wait_for()
            page.locator("#generate-images img").first.wait_for()
            page.screenshot(path=str(ROOT / "docs/screenshot.png"), full_page=True)
            page.get_by_role("tab", name="Anomaly").click()
            page.get_by_role("button", name="Analyze slice").click()
            page.locator("#anomaly-summary").get_by_text("Image score").wait_for()
            page.locator("#lesion-kind").get_by_text("dark").click()
            page.locator("#anomaly-summary").get_by_text("Synthetic lesion: dark").wait_for()
            page.locator("#anomaly-map img").wait_for()
            page.screenshot(path=str(ROOT / "docs/screenshot_anomaly.png"), full_page=True)
            browser.close()
    finally:
        blocks.close()


if __name__ == "__main__":
    main()
