"""The demo page in a real headless Chromium: upload, wait for the overlay, screenshot, then a bad upload.

The screenshot goes to the test's temporary folder; ``DASS_UPDATE_SCREENSHOT=1`` writes ``docs/demo.png`` (the
README's screenshot) instead, so a test run never changes a tracked file. Needs Debian's ``chromium`` (``/usr/bin/chromium``); the CI
script installs it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

expect = pytest.importorskip("playwright.sync_api", reason="pip install 'dass[test]'").expect
from test_app import ROOT, make_models_root, running_demo  # noqa: E402

SYNTHETIC = ROOT / "app" / "examples" / "synthetic_target_1.png"

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
README_SCREENSHOT = ROOT / "docs" / "demo.png"
SHIPPED_MODELS = ROOT / "models"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


def untrained_models_root(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-init export under an honest name, without the made-up stage and mIoU of test_app's fixture
    (the screenshot goes into the README); the ONNX folder is linked, not copied."""
    root = tmp_path_factory.mktemp("untrained")
    model = root / "random-init-resnet18"
    model.mkdir()
    (model / "1").symlink_to(exported / "tiny_source" / "1", target_is_directory=True)
    meta = json.loads((exported / "tiny_source" / "meta.json").read_text())
    for made_up in ("metrics", "benchmark"):
        meta.pop(made_up, None)
    meta.update(name=model.name, stage="untrained")
    (model / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from playwright.sync_api import sync_playwright

    from dass_deploy.repository import list_models

    # the shipped (trained) models make a meaningful screenshot; without them, the tiny export says what it is
    if list_models(SHIPPED_MODELS):
        models_root = SHIPPED_MODELS
    else:
        models_root = untrained_models_root(make_models_root(tmp_path_factory.mktemp("demo")), tmp_path_factory)
    with running_demo(models_root) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def _upload(page, path: Path) -> None:
    page.goto(page.url)  # a fresh page: the input component is empty and shows its upload field
    page.locator("#input_image input[type=file]").set_input_files(str(path))


def test_upload_shows_overlay_and_screenshot(page, tmp_path) -> None:
    _upload(page, SYNTHETIC)  # a target-style scene: what the shipped synthetic-benchmark models are for
    overlay = page.locator("#overlay img")
    overlay.wait_for(state="visible")
    page.locator("#latency").get_by_text(" ms on ", exact=False).wait_for(state="visible")
    expect(page.locator("#shares")).to_contain_text(re.compile(r"\d\.\d"))  # a share row under the header
    assert overlay.evaluate("img => img.naturalWidth") == 512
    assert page.get_by_text("Loaded model:").is_visible()
    shot = README_SCREENSHOT if os.environ.get("DASS_UPDATE_SCREENSHOT") == "1" else tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000


def test_example_click_runs_the_model(page) -> None:
    page.goto(page.url)
    page.locator("#examples").get_by_role("button").last.click()  # synthetic_target_2.png, 512x256
    overlay = page.locator("#overlay img")
    overlay.wait_for(state="visible")
    assert overlay.evaluate("img => img.naturalWidth") == 512


def test_bad_file_shows_error_message(page, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not a picture\n")
    _upload(page, bad)
    toast = page.get_by_test_id("toast-text").filter(has_text="'notes.png' is not an image")
    toast.first.wait_for(state="visible")
    assert page.locator("#overlay img").count() == 0


def test_too_large_file_shows_error_message(page, tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * 30_000_000)  # over the 25 MB upload limit
    _upload(page, big)
    toast = page.get_by_test_id("toast-text").filter(has_text="exceed the maximum allowed size")
    toast.first.wait_for(state="visible")
