"""The web page in a real browser (headless Chromium through selenium) against a real server: add gallery
images through the page (progress bar), then search with a query image and check the grid's first result.
A screenshot is saved in the test's tmp dir and copied to tests/artifacts/ (gitignored).

Skipped, with the reason, where selenium or a chromium/chromedriver binary is missing
(``apt-get install chromium chromium-driver``; ``pip install selenium``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from index.store import image_id

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _browser_or_skip():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no chromium/chromedriver binary on PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        opts.add_argument(a)
    try:
        return webdriver.Chrome(service=Service(driver), options=opts)
    except Exception as e:  # a broken browser install is an environment problem, not a page bug
        pytest.skip(f"chromium did not start: {e}")


def test_page_upload_search_grid(server_factory, tmp_path, image_bytes):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser_or_skip()
    srv = server_factory(api_key="page-key")
    g = "web-gallery"
    files = []
    for i in range(5):
        p = tmp_path / f"person{i}.png"
        p.write_bytes(image_bytes(300 + i, size=(64, 128)))
        files.append(p)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(srv.url + "/")
        browser.find_element(By.ID, "key").send_keys("page-key")
        browser.find_element(By.ID, "newgallery").send_keys(g)
        browser.find_element(By.ID, "ufiles").send_keys("\n".join(str(p) for p in files))
        browser.find_element(By.ID, "ucam").send_keys("cam1")
        browser.find_element(By.ID, "ugo").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "ustatus"), "5 new"))
        assert float(browser.find_element(By.ID, "uprogress").get_attribute("value")) == 1.0
        wait.until(lambda b: g in [o.get_attribute("value") for o in Select(b.find_element(By.ID, "gallery")).options])
        Select(browser.find_element(By.ID, "gallery")).select_by_value(g)
        browser.find_element(By.ID, "file").send_keys(str(files[3]))
        browser.find_element(By.ID, "go").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "result(s)"))
        cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
        assert len(cards) == 5
        assert int(cards[0].get_attribute("data-id")) == image_id(g, files[3].read_bytes())
        assert "camera cam1" in cards[0].text
        # the thumbnails were fetched with the key and decoded
        wait.until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
        shot = tmp_path / "web_page.png"
        browser.save_screenshot(str(shot))
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "web_page.png")
        assert shot.stat().st_size > 1000
    finally:
        browser.quit()
