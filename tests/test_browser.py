"""The demo in a real browser: Debian Chromium driven by playwright against app.py served in-process.

Visits every tab, opens a slice from Browse in Reconstruct, uploads a file, watches a generation fill in, and
saves screenshots to tests/artifacts/. Skipped when /usr/bin/chromium or playwright is missing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import brain_slice, make_folder_tree
from test_anomaly import calibrate_tiny_bundle
from test_app import FRAME_SECONDS, free_port, save_tiny_bundle

pytestmark = [pytest.mark.browser,
              pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting':Warning"),  # gradio's pandas use
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning")]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 20_000

# Records every src an <img> inside #generate-grid takes, including ones replaced before anyone looks.
WATCH_GRID = """() => {
  window.__gridSrcs = [];
  const root = document.querySelector('#generate-grid');
  const note = () => root.querySelectorAll('img').forEach(img => {
    const src = img.getAttribute('src');
    if (src && window.__gridSrcs[window.__gridSrcs.length - 1] !== src) window.__gridSrcs.push(src);
  });
  new MutationObserver(note).observe(root, {subtree: true, childList: true, attributes: true,
                                            attributeFilter: ['src']});
  note();
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import app
    from brainvq.generation import Generator

    root = tmp_path_factory.mktemp("browser")
    generator = Generator(frame_seconds=FRAME_SECONDS)
    checkpoints = calibrate_tiny_bundle(save_tiny_bundle(root / "checkpoints", seed=0))   # Anomaly tab: calibrated
    data_dir = make_folder_tree(root / "data", per_class=2, test_count=6)
    ARTIFACTS.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"BRAINVQ_CACHE": str(root / "cache"),
                            "GRADIO_TEMP_DIR": str(root / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}.items():
            mp.setenv(name, value)
        settings = app.Settings(data_dir=str(data_dir), checkpoints=checkpoints, offline=True, host="127.0.0.1",
                                port=free_port())
        blocks, url = app.launch(settings, generator=generator, prevent_thread_lock=True, quiet=True)
        try:
            with sync_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
                try:
                    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
                    tab.set_default_timeout(TIMEOUT_MS)
                    tab.goto(url)
                    tab.get_by_role("heading", name="BrainVQ").wait_for()
                    yield tab, root, generator
                finally:
                    browser.close()
        finally:
            blocks.close()
            generator.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_browse_select_opens_reconstruct(page):
    tab, *_ = page
    tab.get_by_text("Offline mode").first.wait_for()  # the fallback notice is visible at the top
    gallery = tab.locator("#browse-gallery")
    gallery.locator("img").first.wait_for()
    assert gallery.locator("img").count() == 6
    tab.screenshot(path=str(ARTIFACTS / "browse.png"), full_page=True)
    gallery.locator("button").filter(has=tab.locator("img")).nth(2).click()
    tab.locator("#metrics").get_by_text("PSNR").wait_for()
    assert tab.get_by_role("tab", name="Reconstruct").get_attribute("aria-selected") == "true"
    for element in ("#original", "#code-grid", "#recon"):
        tab.locator(f"{element} img").wait_for()
    tab.screenshot(path=str(ARTIFACTS / "reconstruct.png"), full_page=True)


def test_upload_shows_notes_and_errors(page):
    tab, root, _ = page
    open_tab(tab, "Reconstruct")
    rgb = np.stack([brain_slice(300, 240, 4)] * 3, -1)
    good = root / "upload.png"
    Image.fromarray(rgb).save(good)
    tab.locator("#upload input[type=file]").set_input_files(str(good))
    tab.locator("#notes").get_by_text("resized 240x300").wait_for()
    assert "SSIM" in tab.locator("#metrics").inner_text()
    bad = root / "not-an-image.png"
    bad.write_bytes(b"%PDF-1.4 definitely not pixels")
    tab.locator("#upload").get_by_role("button", name="Clear").first.click()
    tab.locator("#upload input[type=file]").set_input_files(str(bad))
    tab.get_by_text("not an image that can be read").first.wait_for()
    tab.screenshot(path=str(ARTIFACTS / "upload-error.png"), full_page=True)


def test_generate_streams_then_decodes(page):
    tab, *_ = page
    open_tab(tab, "Generate")
    tab.locator("#generate-grid").wait_for()
    tab.evaluate(WATCH_GRID)
    tab.get_by_role("button", name="Generate", exact=True).click()
    tab.locator("#generate-status").get_by_text("Done").wait_for()
    tab.locator("#generate-images img").first.wait_for()
    srcs = tab.evaluate("window.__gridSrcs")
    assert len(srcs) >= 3, srcs  # the grid image changed at least twice while sampling
    assert tab.locator("#generate-images img").count() == 4
    tab.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)


def test_models_tab(page):
    tab, *_ = page
    open_tab(tab, "Models")
    info = tab.locator("#models-info")
    info.get_by_text("codes (K)").wait_for()
    assert "64x64" in info.inner_text()
    tab.get_by_label("Local checkpoint folder").fill("/etc")
    tab.get_by_role("button", name="Load local folder").click()
    tab.locator("#models-status").get_by_text("not inside an allowed checkpoint folder").wait_for()
    assert "64x64" in info.inner_text()
    tab.screenshot(path=str(ARTIFACTS / "models.png"), full_page=True)


def test_stop_says_where_it_stopped_and_the_server_stops_sampling(page):
    tab, _, generator = page
    open_tab(tab, "Generate")
    tab.get_by_label("Seed").fill("99")
    tab.get_by_role("button", name="Generate", exact=True).click()
    status = tab.locator("#generate-status")
    status.get_by_text("Sampling codes").wait_for()
    job = next(job for job in generator.jobs if job.request.seed == 99)
    tab.get_by_role("button", name="Stop").click()
    status.get_by_text("Stopped at").wait_for()
    request = job.request
    assert request.cancelled and not request.done and request.filled < 4096
    assert f"Stopped at {request.filled:,} of 4,096 positions" in status.inner_text()
    positions = generator.positions
    tab.wait_for_timeout(1500)                       # nothing else runs: the server has stopped sampling
    assert generator.positions == positions and generator.jobs == [] and request.filled == job.request.filled
    assert "Stopped at" in status.inner_text()       # and the page still says so, with the partial view
    assert tab.locator("#generate-grid img").count() == 1
    tab.screenshot(path=str(ARTIFACTS / "generate-stopped.png"), full_page=True)


def test_sixteen_samples_are_shown_without_inner_scrolling(page):
    tab, *_ = page
    open_tab(tab, "Generate")
    tab.get_by_label("Seed").fill("5")
    slider = tab.locator("#generate-n input[type=number]")
    slider.fill("16")
    slider.press("Enter")
    tab.get_by_role("button", name="Generate", exact=True).click()
    tab.locator("#generate-status").get_by_text("Done: 16 sample(s)").wait_for()
    images = tab.locator("#generate-images img")
    images.nth(15).wait_for()
    assert images.count() == 16
    scrolled = tab.evaluate("""() => [...document.querySelectorAll('#generate-images *, #generate-grid *')]
        .filter(e => e.scrollHeight > e.clientHeight + 2 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
        .map(e => e.className)""")
    assert scrolled == [], scrolled
    for index in (0, 15):
        box = images.nth(index).bounding_box()
        assert box["width"] > 100 and box["height"] > 100
    tab.screenshot(path=str(ARTIFACTS / "generate-16.png"), full_page=True)


def test_anomaly_tab_maps_a_slice_and_adds_a_lesion_in_one_click(page):
    tab, root, _ = page
    open_tab(tab, "Anomaly")
    tab.get_by_role("button", name="Analyze slice").click()
    summary = tab.locator("#anomaly-summary")
    summary.get_by_text("Image score").wait_for()
    for element in ("#anomaly-original", "#anomaly-nll", "#anomaly-restoration", "#anomaly-map"):
        tab.locator(f"{element} img").wait_for()
    assert "Synthetic lesion" not in summary.inner_text()
    tab.locator("#lesion-kind").get_by_text("bright").click()        # one click: a lesion on the slice shown
    summary.get_by_text("Synthetic lesion: bright, medium").wait_for()
    first = summary.inner_text()
    tab.get_by_role("button", name="Another lesion").click()
    tab.wait_for_function("() => document.querySelector('#lesion-seed input').value === '1'")
    tab.wait_for_function("(first) => { const s = document.querySelector('#anomaly-summary').innerText;"
                          " return s !== first && s.includes('Synthetic lesion: bright'); }", arg=first)
    tab.locator("#anomaly-status").get_by_text("Done.").wait_for()
    tab.locator("#anomaly-map img").wait_for()
    tab.screenshot(path=str(ARTIFACTS / "anomaly.png"), full_page=True)


def test_complete_tab_fills_in_the_hidden_rows(page):
    tab, *_ = page
    open_tab(tab, "Complete")
    tab.get_by_role("button", name="Complete slice").click()
    status = tab.locator("#complete-status")
    status.get_by_text("Done: 4 completion(s)").wait_for()
    assert tab.locator("#complete-images img").count() == 4
    tab.locator("#complete-kept img").wait_for()
    tab.screenshot(path=str(ARTIFACTS / "complete.png"), full_page=True)
