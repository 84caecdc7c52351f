"""The page at / in a real headless Chromium (the system's package, driven by Selenium): choose an X-ray and
a CT, predict, and read what the page shows.

RESPISCAN_SCREENSHOT=1 saves the page as docs/serving_page.png; with RESPISCAN_PAGE_BUNDLE=BUNDLE the page
serves that bundle instead of the tests' tiny one, on realdev's COVID test images when they are there.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from conftest import REALDEV
from respiscan.data.samples import discover

pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serving_page.png"
PAGE_BUNDLE = os.environ.get("RESPISCAN_PAGE_BUNDLE")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium and chromedriver installed "
                                "(Debian: apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """The app under uvicorn in a thread, on a free loopback port."""
    import uvicorn

    from respiscan.serving.server import create_app

    tmp = tmp_path_factory.mktemp("page")
    bundle = Path(PAGE_BUNDLE) if PAGE_BUNDLE else request.getfixturevalue("bundle")
    app = create_app(bundle, temp_dir=tmp / "temp", audit_log=tmp / "audit.jsonl")
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", app
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,1100"):
        options.add_argument(flag)
    # the driver from the system's package: Selenium Manager would try to download one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def images(request) -> dict[str, Path]:
    data = REALDEV if PAGE_BUNDLE and REALDEV.is_dir() else request.getfixturevalue("synth_data")
    samples = [s for s in discover(data) if s.split == "test"]
    return {m: next(s.path for s in samples if s.modality == m and s.label == 1) for m in ("xray", "ct")}


def test_page_predicts_an_xray_and_a_ct(served, browser, images, tmp_path):
    url, app = served
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: "engine" in d.find_element(By.ID, "model").text)
    # a wrong file type is refused on the page, with a message
    letter = tmp_path / "letter.pdf"
    letter.write_bytes(b"%PDF-1.4")
    browser.find_element(By.ID, "xray-file").send_keys(str(letter))
    assert "not a file type the X-ray accepts" in browser.find_element(By.ID, "error").text
    assert not browser.find_element(By.ID, "predict").is_enabled()

    browser.find_element(By.ID, "xray-file").send_keys(str(images["xray"]))
    browser.find_element(By.ID, "ct-file").send_keys(str(images["ct"]))
    browser.find_element(By.ID, "predict").click()
    verdict = wait.until(ec.visibility_of_element_located((By.ID, "verdict"))).text
    wait.until(lambda d: all(i.get_property("naturalWidth") > 0 for i in d.find_elements(By.CSS_SELECTOR,
                                                                                        "img.gradcam")))

    expected = app.state.service.pipeline.predict(xray=images["xray"], ct=images["ct"])
    assert verdict.split()[0] == expected["label"] and f"{expected['probability']:.3f}" in verdict
    for m in ("xray", "ct"):
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, f"#row-{m} td")]
        threshold = app.state.service.pipeline.thresholds[m]
        assert cells[1:3] == [f"{expected[f'{m}_probability']:.3f}", f"{threshold:.3f}"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "img.gradcam")) == 2
    assert browser.find_element(By.ID, "error").text == ""
    if os.environ.get("RESPISCAN_SCREENSHOT"):
        SCREENSHOT.write_bytes(full_page_png(browser))


def full_page_png(driver) -> bytes:
    """The whole page, below the window's fold too (Chromium's DevTools protocol)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    return base64.b64decode(shot["data"])


def test_page_shows_the_servers_message_for_a_bad_file(served, browser, tmp_path):
    url, _ = served
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: "engine" in d.find_element(By.ID, "model").text)
    fake = tmp_path / "scan.png"
    fake.write_bytes(b"not really a PNG")
    browser.find_element(By.ID, "xray-file").send_keys(str(fake))
    browser.find_element(By.ID, "predict").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("xray: ")
    assert not browser.find_element(By.ID, "result").is_displayed()
