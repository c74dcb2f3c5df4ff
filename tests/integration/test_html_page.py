"""The leaderboard page in a real browser: Debian's headless Chromium driven by selenium opens index.html
from disk (no network, no server), the test takes a screenshot and checks the rows, sorting and filters.

Chromium and its driver are Debian packages (``chromium``, ``chromium-driver``); the fixture installs
them with apt where they are absent and the test runs as root (as on CI machines), and skips with the
reason otherwise. Selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium explicitly, with
Selenium Manager offline, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_leaderboard_records import make_record, write_records

from bench.publish import build_leaderboards

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def ensure_chromium() -> None:
    if Path(CHROMIUM).exists() and Path(DRIVER).exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium "
            "chromium-driver) and this process cannot install them"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    ensure_chromium()
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    recs = []
    scores = {
        "kd": (0.90, 0.91, 0.92),
        "taid": (0.80, 0.83, 0.81),
        "minima": (0.70, 0.72, 0.71),
        "student": (0.60, 0.62, 0.61),
        "teacher": (0.99, 0.99, 0.99),
    }
    lat = {"kd": 3.0, "taid": 1.0, "minima": 2.0, "student": 1.5, "teacher": 9.0}
    for method, vals in scores.items():
        for seed, v in enumerate(vals):
            recs.append(
                make_record(subtask="sst2", method=method, seed=seed, score=v, latency_ms=lat[method])
            )
    recs.append(
        make_record(subtask="rte", method="kd", seed=0, status="failed", reason="RuntimeError: NaN loss")
    )
    recs.append(make_record(subtask="sst2", method="kd", seed=0, profile="h100-sxm", score=0.95))
    root = tmp_path_factory.mktemp("html")
    build_leaderboards([write_records(root / "runs", recs)], root / "lb", command="bench leaderboard build")
    return root / "lb" / "index.html"


def column(driver, table_id: str, index: int) -> list[str]:
    rows = driver.find_elements("css selector", f"#{table_id} tbody tr")
    return [
        r.find_elements("css selector", "td")[index].get_attribute("data-v") for r in rows if r.is_displayed()
    ]


def test_page_rows_sorting_filtering_and_screenshot(browser, page, tmp_path):
    browser.get(page.as_uri())
    assert browser.title == "bench leaderboards"
    tid = "t-glue-smoke-cpu-2core"
    # every row is there, in the harness's order, the failed cell visible
    assert column(browser, tid, 0) == ["teacher", "student", "kd", "minima", "taid"]
    kd_row = browser.find_elements("css selector", f"#{tid} tbody tr")[2]
    assert "failed" in kd_row.text and "1 failed" in kd_row.text
    assert browser.find_element("id", "count").text == "showing 6 of 6 rows"
    best = browser.find_elements("css selector", f"#{tid} td.best")
    assert best and best[0].get_attribute("data-v").startswith("91")
    shot = tmp_path / "leaderboard.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from matplotlib.image import imread

    img = imread(str(shot))
    assert img.shape[0] >= 700 and img.shape[1] >= 1200
    assert (
        len({tuple(px) for px in img[::25, ::25].reshape(-1, img.shape[2]).round(2).tolist()}) > 5
    )  # not blank

    # sort by the sst2 column: ascending, then descending; the page's numbers are in data-v
    heads = browser.find_elements("css selector", f"#{tid} thead th")
    labels = [h.text.strip() for h in heads]
    sst2 = labels.index("sst2")
    heads[sst2].find_element("tag name", "button").click()
    asc = [float(v) for v in column(browser, tid, sst2)]
    assert asc == sorted(asc) and column(browser, tid, 0)[0] == "student"
    assert heads[sst2].get_attribute("aria-sort") == "ascending"
    heads[sst2].find_element("tag name", "button").click()
    desc = [float(v) for v in column(browser, tid, sst2)]
    assert desc == sorted(desc, reverse=True) and column(browser, tid, 0)[0] == "teacher"
    # latency: lower first on ascending
    lat_idx = labels.index("latency (ms)")
    heads[lat_idx].find_element("tag name", "button").click()
    assert column(browser, tid, 0)[0] == "taid"
    # sorting by rte: the only value first, the rows without one (failed or not run) last
    rte = labels.index("rte")
    heads[rte].find_element("tag name", "button").click()
    assert column(browser, tid, rte)[-1] == ""

    # free-text filter, then the status filter, then the table selector
    box = browser.find_element("id", "q")
    box.send_keys("minima")
    assert column(browser, tid, 0) == ["minima"]
    assert browser.find_element("id", "count").text == "showing 1 of 6 rows"
    box.clear()
    box.send_keys(" ")  # an input event with an empty query shows everything again
    assert len(column(browser, tid, 0)) == 5
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "status")).select_by_value("problems")
    assert column(browser, tid, 0) == ["kd"]
    Select(browser.find_element("id", "status")).select_by_value("")
    Select(browser.find_element("id", "which")).select_by_value("glue-smoke-h100-sxm")
    assert not browser.find_element(
        "css selector", "section[data-slug='glue-smoke-cpu-2core']"
    ).is_displayed()
    assert column(browser, "t-glue-smoke-h100-sxm", 0) == ["kd"]
    browser.save_screenshot(str(tmp_path / "filtered.png"))
    # the Pareto plots are inline images that rendered (offline: data URIs)
    Select(browser.find_element("id", "which")).select_by_value("")
    imgs = browser.find_elements("css selector", "section[data-slug='glue-smoke-cpu-2core'] figure img")
    assert len(imgs) == 2
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 300 for i in imgs)
