"""A headless Debian chromium driven by selenium, and a real server for it to talk to.

No browser or driver is ever downloaded: chromium and chromedriver come from the Debian
packages ``chromium`` and ``chromium-driver``; both paths are given to selenium, so its
selenium-manager is never run.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT, copy_default_model, make_tiny_model, sample_files
from tests.server import running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = PROJECT_ROOT / "artifacts" / "web"


def _browser_missing() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            return f"{path} is absent (apt-get install -y chromium chromium-driver; no {package})"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1200",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def web_models(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny model and another one a cascade's later stage runs on, plus the real
    default model when the shared sample photos exist."""
    root = tmp_path_factory.mktemp("web-models")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    make_tiny_model(root, "tiny2", input_size=80, crop_pct=0.875, seed=1, interpolation="bicubic")
    names = ["tiny", "tiny2"]
    if sample_files():
        names += copy_default_model(root)
    return root, ",".join(names)


@pytest.fixture(scope="module")
def web_server(
    web_models: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root, names = web_models
    log = tmp_path_factory.mktemp("web-server") / "server.log"
    with running_server(root, names, log_path=log) as base:
        yield base


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
