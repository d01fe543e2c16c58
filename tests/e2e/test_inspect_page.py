"""The inspection page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium).

`python -m tests.e2e.test_inspect_page URL OUT.png [layer head prompt]` takes the README's screenshot the same way.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

pytestmark = pytest.mark.e2e
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]


@contextmanager
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def submit(driver, url: str, prompt: str, wait: float = 120, **params: object) -> int:
    """Opens the page, submits `prompt`, waits for the heatmap; returns the number of tokens it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/inspect" + ("?" + urlencode(params) if params else ""))
    WebDriverWait(driver, wait).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, wait).until(
        ec.any_of(
            ec.presence_of_element_located((By.ID, "heatmap")),
            ec.presence_of_element_located((By.ID, "multiples")),
        )
    )
    return len(driver.find_elements(By.CSS_SELECTOR, ".row-label"))


@pytest.mark.skipif(not Path(CHROMEDRIVER).exists(), reason="chromium-driver is not installed (.ci/run installs it)")
def test_page_shows_the_heatmap_of_a_prompt(tiny_server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    prompt = "The quick brown fox jumps over the lazy dog."
    api = httpx.post(
        tiny_server.v1 + "/inspect", json={"model": "tiny", "prompt": prompt, "layers": [1], "top_k": 10}, timeout=60
    ).json()
    n = len(api["tokens"])
    with browser() as driver:
        assert submit(driver, tiny_server.url, prompt, layer=1, head=2) == n
        heatmap = driver.find_element(By.ID, "heatmap")
        assert int(heatmap.get_attribute("data-rows")) == int(heatmap.get_attribute("data-cols")) == n
        assert len(driver.find_elements(By.CSS_SELECTOR, ".col-label")) == n
        labels = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".row-label")]
        assert labels == [t["text"].replace(" ", "\u00b7") for t in api["tokens"]]
        canvas = heatmap.find_element(By.TAG_NAME, "canvas")
        assert canvas.get_attribute("width") == canvas.get_attribute("height")
        assert int(canvas.get_attribute("width")) % n == 0

        # hover the cell (query n-1, key 0): the tooltip shows the API's value for layer 1, head 2
        cell = int(canvas.get_attribute("width")) // n
        ActionChains(driver).move_to_element_with_offset(
            canvas, cell // 2 - canvas.size["width"] // 2, (n - 1) * cell + cell // 2 - canvas.size["height"] // 2
        ).perform()
        tip = driver.find_element(By.ID, "tooltip").text
        want = api["layers"][0]["heads"][2]["attention"][n - 1][0]
        assert f"query {n - 1}" in tip and "key   0" in tip, tip
        assert abs(float(tip.rsplit(" ", 1)[1]) - want) < 2e-3, (tip, want)  # float16 on the wire

        # the next-token chart at the last position: the API's top 10, most likely first
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar-label")
        assert [b.get_attribute("textContent") for b in bars] == [
            c["text"].replace(" ", "\u00b7").replace("\n", "\u23ce") for c in api["next_tokens"][n - 1]
        ]

        # every head of the layer as small multiples
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "head")).select_by_value("all")
        multiples = driver.find_elements(By.CSS_SELECTOR, "#multiples canvas")
        assert len(multiples) == len(api["layers"][0]["heads"])
        shot = tmp_path / "inspect.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


if __name__ == "__main__":
    url, out, *rest = sys.argv[1:]
    layer, head, prompt = (rest + [None] * 3)[:3] if rest else ("0", "all", None)
    with browser() as d:
        d.set_window_size(1320, 860)
        submit(d, url, prompt or "The quick brown fox jumps over the lazy dog.", layer=layer, head=head)
        d.save_screenshot(out)
    print(out)
