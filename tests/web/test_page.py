"""The try-it page in a real headless chromium against a real server.

What the page shows is checked against the classify API's own answer for the same photo,
parameters and seed: the top-5 rows, every view (kind, box, per-view top-1), the legend's
counts, the boxes' colours on the canvas, the hover tooltip, and the API's error message.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.helpers import DEFAULT_MODEL, image_bytes, sample_files

pytestmark = pytest.mark.slow  # a real browser against a real server

WAIT_S = 90


def _wait(driver: Any, condition: Any, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _open(driver: Any, base: str, model: str) -> None:
    """Load the page and pick ``model`` once the model list has arrived."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(base + "/")
    selector = f"#model option[value='{model}']:not([disabled])"
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, selector))
    Select(driver.find_element(By.ID, "model")).select_by_value(model)


def _type(driver: Any, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _upload_and_wait(driver: Any, path: Path) -> str:
    """Choose the file (the page classifies at once); 'result' or 'error', whichever shows."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))

    def settled(d: Any) -> str | bool:
        if d.find_element(By.ID, "error").is_displayed():
            return "error"
        if d.find_element(By.ID, "result").is_displayed():
            return "result"
        return False

    return str(_wait(driver, settled))


def _api(base: str, model: str, data: bytes, name: str, params: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/models/{model}/classify",
        params=params,
        files=[("images", (name, data, "application/octet-stream"))],
        timeout=WAIT_S,
    )


def _top_rows(driver: Any, table_id: str) -> list[tuple[int, str, float]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr[data-index]")
    return [
        (
            int(r.get_attribute("data-index")),
            r.find_element(By.CSS_SELECTOR, ".label").get_attribute("textContent"),
            float(r.get_attribute("data-prob")),
        )
        for r in rows
    ]


def _api_rows(result: dict[str, Any]) -> list[tuple[int, str, float]]:
    return [(t["index"], t["label"], t["prob"]) for t in result["top"]]


def _isolated_view(boxes: list[list[float]]) -> int:
    """The view whose box centre lies farthest from every other view's centre."""
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]

    def gap(i: int) -> float:
        others = [math.dist(centres[i], c) for j, c in enumerate(centres) if j != i]
        return min(others, default=math.inf)

    return max(range(len(boxes)), key=gap)


COUNT_COLOURS = """
const [canvas, colours] = arguments;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const wanted = colours.map((c) => c.match(/\\d+/g).slice(0, 3).map(Number));
const counts = wanted.map(() => 0);
for (let p = 0; p < data.length; p += 4) {
  for (let k = 0; k < wanted.length; k++) {
    const w = wanted[k];
    if (data[p] === w[0] && data[p + 1] === w[1] && data[p + 2] === w[2]) counts[k]++;
  }
}
return counts;
"""


CASES = [
    pytest.param("tiny", {"views": "fixed:5,mfixed:5,random:4,mrandom:4"}, "logit", id="tiny"),
    pytest.param("tiny", {"views": "center,full@96,mfull@96"}, "softmax", id="tiny-whole-image"),
    pytest.param(
        "tiny", {"views": "center|margin<1|full@96,mfull@96"}, "softmax", id="tiny-staged"
    ),
    pytest.param(
        "tiny", {"views": "center|margin<1|tiny2:full,mfull"}, "softmax", id="tiny-cascade"
    ),
    pytest.param(
        DEFAULT_MODEL, {"crops": "20"}, "softmax", id="default-model", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("model", "mid", "level"), CASES)
def test_page_draws_views_and_top5_matching_the_api(
    browser: Any,
    web_server: str,
    web_models: tuple[Path, str],
    tmp_path: Path,
    artifacts: Path,
    model: str,
    mid: dict[str, str],
    level: str,
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    if model not in web_models[1].split(","):
        pytest.skip(f"{model} needs the shared sample photos (../shared/data/imagenet-samples)")
    driver, seed = browser, 1234
    if model == "tiny":
        photo = tmp_path / "noise.png"
        photo.write_bytes(image_bytes(240, 180, seed=3))
    else:
        photo = next((p for p in sample_files() if "tench" in p.name), sample_files()[0])
    width, height = Image.open(photo).size

    _open(driver, web_server, model)
    if "crops" in mid:
        _type(driver, "crops", mid["crops"])
    else:
        _type(driver, "views", mid["views"])
    driver.find_element(By.CSS_SELECTOR, f"#level option[value='{level}']").click()
    _type(driver, "seed", str(seed))
    assert _upload_and_wait(driver, photo) == "result", driver.find_element(By.ID, "error").text

    data = photo.read_bytes()
    common = {"level": level, "top_k": 5, "seed": seed}
    center = _api(web_server, model, data, photo.name, {"views": "center", **common})
    full = _api(web_server, model, data, photo.name, {**mid, **common})
    assert center.status_code == 200 and full.status_code == 200
    c, m = center.json()["results"][0], full.json()["results"][0]

    # top-5 for the center crop next to top-5 for MID, exactly the API's
    assert _top_rows(driver, "top-center") == _api_rows(c)
    assert _top_rows(driver, "top-mid") == _api_rows(m)
    assert len(_api_rows(m)) == 5
    caption = driver.find_element(By.ID, "mid-caption").text
    assert m["spec"] in caption and level in caption
    assert f"{m['view_equivalents']:g} view-equivalents" in caption
    stage_text = driver.find_element(By.ID, "stages").text
    if m.get("stages"):  # a staged policy: which stages ran, on which model, what gates saw
        for k, stage in enumerate(m["stages"]):
            shown = f"stage {k + 1}: {stage['spec']} on {stage['model']}"
            assert shown in stage_text and ("ran" if stage["ran"] else "skipped") in stage_text
        assert f"saw {m['stages'][1]['signal']:g}" in stage_text
        assert f"answered by {'+'.join(m['answered_by'])}" in stage_text
        if "tiny2:" in mid.get("views", ""):  # the cascade: its second stage on tiny2
            assert [s["model"] for s in m["stages"]] == ["tiny", "tiny2"]
            assert m["answered_by"] == ["tiny", "tiny2"]
    else:
        assert stage_text == ""
    assert f"seed {seed}" in driver.find_element(By.ID, "summary").text

    # every view: kind, box and per-view top-1, in the API's order
    rows = driver.find_elements(By.CSS_SELECTOR, "#view-list tbody tr")
    assert len(rows) == len(m["view_boxes"]) == m["views"]
    for row, view, top1 in zip(rows, m["view_boxes"], m["view_top1"], strict=True):
        cells = row.find_elements(By.TAG_NAME, "td")
        assert row.get_attribute("data-kind") == view["kind"]
        shown_box = re.findall(r"-?[\d.]+", cells[2].get_attribute("textContent"))
        assert [float(n) for n in shown_box] == view["box"]
        assert cells[3].get_attribute("textContent").startswith(top1["label"] + " ")

    # the legend counts each kind, and each kind's colour is really drawn on the canvas
    kinds = Counter(v["kind"].split("@")[0] for v in m["view_boxes"])  # "full@288" -> full
    legend = driver.find_elements(By.CSS_SELECTOR, "#legend li[data-kind]")
    shown = {li.get_attribute("data-kind"): int(li.get_attribute("data-count")) for li in legend}
    every = ("center", "fixed", "mfixed", "random", "mrandom", "full", "mfull")
    assert shown == {k: kinds.get(k, 0) for k in every}
    present = [li for li in legend if kinds.get(li.get_attribute("data-kind"), 0)]
    colours = [
        li.find_element(By.CSS_SELECTOR, ".swatch").value_of_css_property("border-top-color")
        for li in present
    ]
    canvas = driver.find_element(By.ID, "canvas")
    counts = driver.execute_script(COUNT_COLOURS, canvas, colours)
    assert all(n > 20 for n in counts), dict(zip(colours, counts, strict=True))

    # the timings of both calls, stage by stage
    stages = {
        r.get_attribute("data-stage")
        for r in driver.find_elements(By.CSS_SELECTOR, "#timings tbody tr")
    }
    assert set(m["timings_ms"]) <= stages and {"server total", "browser round trip"} <= stages

    # hover the centre of the most isolated box: its view's kind and top-1 show
    k = _isolated_view([v["box"] for v in m["view_boxes"]])
    x0, y0, x1, y1 = m["view_boxes"][k]["box"]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    rect = driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", canvas)
    sx, sy = rect["width"] / width, rect["height"] / height
    dx = round((x0 + x1) / 2 * sx - rect["width"] / 2)
    dy = round((y0 + y1) / 2 * sy - rect["height"] / 2)
    ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).perform()
    tip = driver.find_element(By.ID, "tip")
    _wait(driver, lambda d: tip.is_displayed(), timeout=10)
    assert tip.get_attribute("data-view") == str(k)
    assert tip.get_attribute("data-kind") == m["view_boxes"][k]["kind"]
    assert f"view {k + 1} of {m['views']}" in tip.text and m["view_top1"][k]["label"] in tip.text
    assert "hot" in (rows[k].get_attribute("class") or "")

    shot = artifacts / f"page-{model}.png"
    driver.execute_script("window.scrollTo(0, 0)")
    ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).perform()
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_non_image_upload_shows_the_api_message(
    browser: Any, web_server: str, tmp_path: Path, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    bogus = tmp_path / "notes.txt"
    bogus.write_text("this is not a photo\n")
    _open(browser, web_server, "tiny")
    assert _upload_and_wait(browser, bogus) == "error"

    answer = _api(web_server, "tiny", bogus.read_bytes(), bogus.name, {"views": "center"})
    assert answer.status_code == 422
    error = answer.json()["error"]
    box = browser.find_element(By.ID, "error")
    assert box.find_element(By.CSS_SELECTOR, ".error-message").text == error["message"]
    assert error["type"] in box.text and "422" in box.text
    assert not browser.find_element(By.ID, "result").is_displayed()
    assert browser.save_screenshot(str(artifacts / "page-error.png"))


def test_page_and_its_assets_come_from_the_server_itself(web_server: str) -> None:
    page = httpx.get(web_server + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/static/ui/app.js" in refs and "/static/ui/style.css" in refs
    for ref in refs:
        assert ref.startswith("/"), f"{ref} is not served by midserve"
        assert httpx.get(web_server + ref, timeout=10).status_code == 200, ref
    assert "/" not in httpx.get(web_server + "/openapi.json").json()["paths"]


@pytest.mark.slow
def test_token_pasted_on_the_page_unlocks_a_protected_server(
    browser: Any, tiny_repo: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from tests.server import running_server

    photo = tmp_path / "noise.png"
    photo.write_bytes(image_bytes(160, 120, seed=5))
    env = {"MIDSERVE_AUTH_TOKENS": '["page-token"]'}
    with running_server(tiny_repo, env=env, log_path=tmp_path / "server.log") as base:
        browser.get(base + "/")
        box = browser.find_element(By.ID, "error")
        _wait(browser, lambda d: box.is_displayed())
        refused = httpx.get(base + "/v1/models").json()["error"]
        assert box.find_element(By.CSS_SELECTOR, ".error-message").text == refused["message"]
        assert "401" in box.text and browser.find_element(By.ID, "auth").get_attribute("open")

        browser.find_element(By.ID, "token").send_keys("page-token", Keys.TAB)
        _open_model = "#model option[value='tiny']:not([disabled])"
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, _open_model))
        assert not box.is_displayed()
        assert _upload_and_wait(browser, photo) == "result", box.text
        rows = _top_rows(browser, "top-mid")
        answer = httpx.post(
            base + "/v1/models/tiny/classify",
            params={"seed": browser.find_element(By.ID, "seed").get_attribute("value")},
            files=[("images", (photo.name, photo.read_bytes(), "image/png"))],
            headers={"Authorization": "Bearer page-token"},
        ).json()["results"][0]
        assert rows == _api_rows(answer)
