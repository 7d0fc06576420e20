"""The web page in a real browser (headless Chromium through selenium) against a real server: add gallery
images through the page (progress bar), then search with a query image and check the grid's first result;
browse a gallery page by page, search with a click on one of its images, on a result and on a dot of the
timeline (results by camera and capture time); and the API docs (/docs, /redoc) render from the service's own
copies of their scripts. The page runs under its Content-Security-Policy: the browser must report no violation.
A screenshot is saved in the test's tmp dir and copied to tests/artifacts/ (gitignored).

Skipped, with the reason, where selenium or a chromium/chromedriver binary is missing
(``apt-get install chromium chromium-driver``; ``pip install selenium``); under CI=true that fails instead
(``.ci/run`` installs both packages)."""

from __future__ import annotations

import shutil
from pathlib import Path

from index.store import image_id
from tests.ci import missing

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _browser_or_skip():
    """Headless Chromium; where it is missing the test skips (fails under CI=true, see tests/ci.py)."""
    try:
        from selenium import webdriver
    except ImportError:
        missing("selenium is not installed (pip install selenium)")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        missing("no chromium/chromedriver binary on PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, where CSP violations show
    try:
        return webdriver.Chrome(service=Service(driver), options=opts)
    except Exception as e:  # a broken browser install is an environment problem, not a page bug
        missing(f"chromium did not start: {e}")


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
        assert "camera cam1" in cards[0].text and "unlabelled" in cards[0].text
        assert cards[0].get_attribute("data-id") not in cards[0].text  # the raw id only in the tooltip
        # the key is kept for the tab only
        assert browser.execute_script("return sessionStorage.getItem('reidKey')") == "page-key"
        assert browser.execute_script("return localStorage.length") == 0
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


def _csp_violations(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


def test_page_browse_click_to_search_and_timeline(server_factory, tmp_path, image_bytes):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser_or_skip()
    srv = server_factory(api_key="page-key")
    g, key = "people", {"X-API-Key": "page-key"}
    # 13 people, each seen by cam0 then, an hour later, by cam1: 26 images, two pages of the gallery view
    blobs, meta = [], []
    for p in range(13):
        for c in range(2):
            blobs.append(("files", (f"{p}_{c}.png", image_bytes(500 + 10 * p + c, size=(64, 128)))))
            meta.append({"person_id": f"p{p:02d}", "camera_id": f"cam{c}", "external_id": f"ext-{p}-{c}",
                         "captured_at": f"2024-05-01T{10 + c}:{p:02d}:00Z"})
    import json

    r = httpx.post(f"{srv.url}/v1/galleries/{g}/images", files=blobs, data={"metadata": json.dumps(meta)},
                   headers=key, timeout=60)
    assert r.status_code == 201, r.text
    ids = [x["id"] for x in r.json()["items"]]

    def cards(where):
        return browser.find_elements(By.CSS_SELECTOR, f"#{where} .card")

    def searched_with(image):  # the status says done and the query is that image, left out of its results
        def done(b):
            desc = b.find_element(By.ID, "querydesc").text
            return ("result(s)" in b.find_element(By.ID, "status").text and desc.startswith("gallery image")
                    and image not in [c.get_attribute("data-id") for c in cards("grid")]
                    and b.execute_script("return document.querySelectorAll('#timeline .dot').length") > 0)
        return done

    try:
        wait = WebDriverWait(browser, 30)
        browser.get(srv.url + "/")
        browser.find_element(By.ID, "key").send_keys("page-key")
        browser.find_element(By.ID, "reload").click()
        wait.until(lambda b: g in [o.get_attribute("value") for o in Select(b.find_element(By.ID, "gallery")).options])
        Select(browser.find_element(By.ID, "gallery")).select_by_value(g)

        # the gallery view, a page at a time, in id order
        wait.until(lambda b: len(cards("browse")) == 24)
        assert browser.find_element(By.ID, "pageinfo").text == "images 1–24 of 26"
        assert [c.get_attribute("data-id") for c in cards("browse")] == [str(i) for i in sorted(ids)[:24]]
        assert not browser.find_element(By.ID, "next").get_property("disabled")
        browser.find_element(By.ID, "next").click()
        wait.until(lambda b: len(cards("browse")) == 2)
        assert browser.find_element(By.ID, "pageinfo").text == "images 25–26 of 26"
        assert browser.find_element(By.ID, "next").get_property("disabled")
        browser.find_element(By.ID, "prev").click()
        wait.until(lambda b: len(cards("browse")) == 24)

        # a click on a gallery image searches with it
        target = str(ids[10])  # person p05, cam0
        browser.find_element(By.CSS_SELECTOR, f'#browse .card[data-id="{target}"]').click()
        wait.until(searched_with(target))
        assert "person p05, camera cam0, 2024-05-01 10:05 UTC" in browser.find_element(By.ID, "querydesc").text
        assert browser.find_element(By.ID, "qcam").get_property("value") == "cam0"
        results = cards("grid")
        assert len(results) == 10
        for c in results:  # what a person reads: label, camera, time, external id; not the raw id
            assert "person p" in c.text and "camera cam" in c.text and "2024-05-01 1" in c.text and "ext-" in c.text
            assert c.get_attribute("data-id") not in c.text

        # the timeline: a dot per result on its camera's row, numbered by rank
        dots = browser.find_elements(By.CSS_SELECTOR, "#timeline .dot")
        assert len(dots) == 10
        assert sorted(d.find_element(By.CSS_SELECTOR, "text").text for d in dots) == sorted(str(i) for i in range(1, 11))
        assert {d.get_attribute("data-id") for d in dots} == {c.get_attribute("data-id") for c in results}
        rows = {t.text for t in browser.find_elements(By.CSS_SELECTOR, "#timeline .cam")}
        assert rows <= {"camera cam0", "camera cam1"} and rows
        shot = tmp_path / "web_page_timeline.png"
        browser.save_screenshot(str(shot))
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "web_page_timeline.png")

        # a click on a result searches with it, and so does a click on a dot of the timeline
        first = results[0].get_attribute("data-id")
        results[0].click()
        wait.until(searched_with(first))
        dot = browser.find_elements(By.CSS_SELECTOR, "#timeline .dot")[-1]  # drawn last: rank 1
        picked = dot.get_attribute("data-id")
        dot.click()
        wait.until(searched_with(picked))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "result(s)"))
        assert _csp_violations(browser) == []
    finally:
        browser.quit()


def test_api_docs_render_without_internet(live_server):
    """/docs and /redoc draw the API from the service's own copies of their scripts (this machine, like the
    service's, may have no internet: a CDN-loaded page stays blank)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser_or_skip()
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(live_server + "/docs")
        wait.until(lambda b: "ReID retrieval service" in b.find_element(By.CSS_SELECTOR, "body").text)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) >= 20)  # every operation listed
        assert any("/v1/galleries/{gallery}/images/{image_id}/search" in op.text
                   for op in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary"))
        browser.get(live_server + "/redoc")
        wait.until(lambda b: "ReID retrieval service" in b.find_element(By.CSS_SELECTOR, "body").text)
        assert _csp_violations(browser) == []
    finally:
        browser.quit()
