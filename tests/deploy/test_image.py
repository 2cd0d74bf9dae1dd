"""The image, built from the repository's Dockerfile and serving: what `docker build` and
`docker compose up` would give a first user, without a Docker engine (tests/deploy/image.py).

The build runs on a Debian-made Python 3.11 base with this machine's package sources; the
container runs the image's own command as the image's user, with the compose file's
environment and volumes, in a network namespace of its own. Then: /readyz, a shared photo
over /v1 and /v2 (top-1 equal to this checkout's /v1 outside the image, same photo and
views), /metrics, the image's HEALTHCHECK command, the tuning cache in the compose volume,
and a graceful stop. Image size and build time are printed.

Needs root (debootstrap chroots; the test makes a network namespace), about 30 GB of free
disk while it builds (with torch's CUDA wheels, when that is the torch this checkout runs),
and the network for Debian's and pip's package sources. The tests below share one
container, in file order; the last one stops it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from fastapi.testclient import TestClient

from app.config import Settings, default_models_dir
from app.serve_process import running_process
from tests.deploy.image import (
    Buildah,
    Built,
    Netns,
    build,
    compose_service,
    container_run,
    make_base,
    network,
    pip_conf,
    pip_settings,
    torch_build_args,
)
from tests.deploy.tools import MISSING, find_tool
from tests.helpers import DEFAULT_MODEL, PROJECT_ROOT, SAMPLES_MISSING, sample_files
from tests.inprocess import in_process_app
from tests.server import scrape, total

# the first test also waits for the base, the build and the start: minutes, not seconds
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BASE_TAG = "localhost/midserve-test-base:py311"
IMAGE_TAG = "localhost/midserve:test"
COMPOSE = PROJECT_ROOT / "docker-compose.yml"
CACHE_VOLUME = "midserve-cache"
PORT = 8000  # the image's: EXPOSE, CMD and HEALTHCHECK all say 8000
VIEWS = "fixed:5,mfixed:5"  # deterministic views, so inside and outside see the same pixels
ARTIFACTS = PROJECT_ROOT / "artifacts"


Report = Callable[[str], None]


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Report:
    """A line in the terminal's output (`make test` shows it; print would be captured)."""
    plugins = request.config.pluginmanager
    terminal = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")

    def write(line: str) -> None:
        if terminal is None or capture is None:
            print(f"[image] {line}")
            return
        with capture.global_and_fixture_disabled():
            terminal.ensure_newline()
            terminal.write_line(f"[image] {line}")

    return write


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    found = {name: find_tool(name) for name in ("buildah", "debootstrap", "ip", "nsenter")}
    for name, path in found.items():
        if path is None:
            pytest.skip(MISSING[name])
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap chroots, the container gets a network namespace")
    if not sample_files():
        pytest.skip(SAMPLES_MISSING)
    probe = subprocess.run([str(found["ip"]), "netns", "add", f"midserve-probe-{os.getpid()}"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"no network namespaces here (ip netns add: {probe.stderr.strip()})")
    subprocess.run([str(found["ip"]), "netns", "delete", f"midserve-probe-{os.getpid()}"])
    return {name: str(path) for name, path in found.items()}


@pytest.fixture(scope="module")
def buildah(tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    """A storage folder for this module's images and containers, deleted afterwards."""
    b = Buildah(tools["buildah"], tmp_path_factory.mktemp("buildah"))
    try:
        yield b
    finally:
        b.remove_everything()


@pytest.fixture(scope="module")
def image(buildah: Buildah, tools: dict[str, str], report: Report) -> Built:
    ARTIFACTS.mkdir(exist_ok=True)
    start = time.monotonic()
    origin = make_base(buildah, tools["debootstrap"], BASE_TAG, ARTIFACTS / "image-base.log")
    report(f"base: Debian bookworm + python3 (3.11), {origin}, {time.monotonic() - start:.0f} s")
    settings = pip_settings()
    conf, mounts = pip_conf(settings)
    conf_file = buildah.folder / "pip.conf"
    conf_file.write_text(conf)
    args = {"BASE_IMAGE": BASE_TAG, **torch_build_args(settings)}
    # /etc/pip.conf: pip's global config file, on Debian's python3 and python:3.11 alike
    mounts_at = [(m, m) for m in mounts] + [(str(conf_file), "/etc/pip.conf")]
    built = build(buildah, PROJECT_ROOT, IMAGE_TAG, args, mounts_at, ARTIFACTS / "image-build.log")
    torch_args = ", ".join(f"{k}={v}" for k, v in args.items() if k != "BASE_IMAGE")
    report(f"build: {built.seconds:.0f} s ({buildah.driver} storage), image {built.size}, "
           f"{torch_args}")  # fmt: skip
    return built


@dataclass
class Container:
    base: str  # http://address:8000, the container's port from this side
    netns: Netns
    name: str
    cache: Path  # the host folder mounted where the compose file mounts its cache volume
    cache_target: str
    runner: subprocess.Popen[bytes]
    user: str

    def server(self) -> psutil.Process:
        """The image's command as it runs inside (a descendant of buildah run)."""
        for proc in psutil.Process(self.runner.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                argv = proc.cmdline()  # python3 /opt/venv/bin/midserve serve ...
                if argv and Path(argv[0]).name.startswith("python") and "serve" in argv:
                    return proc
        raise AssertionError("the server process is not running")


def healthcheck_command(config: dict[str, Any]) -> list[str]:
    test = config["Healthcheck"]["Test"]
    assert test[0] == "CMD", test
    return list(test[1:])


def healthcheck_exec(nsenter: str, c: Container, config: dict[str, Any]) -> int:
    """The image's HEALTHCHECK command run in the running container, as `docker exec` runs
    it: the server's namespaces, root and working directory, the image's user and
    environment. (Not a second `buildah run` of the same container: buildah 1.28 unmounts
    the container under the first one when the second ends.)"""
    uid, _, gid = config["User"].partition(":")
    env = dict(item.split("=", 1) for item in config["Env"])
    cmd = [nsenter, f"--target={c.server().pid}", "--all", "--root", "--wd",
           f"--setuid={uid}", f"--setgid={gid or uid}", "--"]  # fmt: skip
    cmd += healthcheck_command(config)
    return subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode


@pytest.fixture(scope="module")
def container(
    image: Built, buildah: Buildah, tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """The image started as `docker compose up` would start it, ready (/readyz 200)."""
    env, volumes = compose_service(yaml.safe_load(COMPOSE.read_text()), "midserve")
    name = buildah("from", "--pull-never", "--name", f"midserve-test-{os.getpid()}", image.tag)
    rootfs = Path(buildah("mount", name))
    mounts, cache, cache_target = [], None, ""
    for volume in volumes:
        source, target, *mode = volume.split(":")
        if source == CACHE_VOLUME:
            # a new named volume starts as a copy of the image's folder, owner included
            cache = tmp_path_factory.mktemp("cache-volume")
            st = (rootfs / target.lstrip("/")).stat()
            os.chown(cache, st.st_uid, st.st_gid)
            source, cache_target = str(cache), target
        elif source.startswith("."):
            source = str((COMPOSE.parent / source).resolve())
        mounts.append(":".join([source, target, *mode]))
    buildah("umount", name)
    assert cache is not None, f"{COMPOSE.name} mounts no {CACHE_VOLUME} volume"
    cmd = [*(image.config.get("Entrypoint") or []), *image.config["Cmd"]]
    with network(tools["ip"]) as netns:
        base = f"http://{netns.address}:{PORT}"
        with running_process(
            container_run(buildah, netns, name, cmd, env=env, volumes=mounts),
            base + "/readyz", log_path=ARTIFACTS / "image-serve.log", name="the image's server",
            ready_timeout_s=600,
        ) as runner:  # fmt: skip
            c = Container(base, netns, name, cache, cache_target, runner, image.config["User"])
            yield c
            stop(c)


def stop(c: Container) -> int | None:
    """SIGTERM to the image's command (what `docker stop` sends); buildah run's exit code."""
    if c.runner.poll() is None:
        with contextlib.suppress(AssertionError, psutil.Error):
            c.server().send_signal(signal.SIGTERM)
        try:
            c.runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return None
    return c.runner.returncode


def client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=120, trust_env=False)  # never via a proxy


def test_runs_as_its_non_root_user_and_tunes_into_the_compose_cache_volume(
    container: Container, report: Report
) -> None:
    uid = int(container.user.split(":")[0])
    assert uid != 0
    assert container.server().uids().real == uid
    tuned = sorted(container.cache.rglob("*.json"))
    assert tuned, f"no tuned plan under {container.cache_target} (the compose volume)"
    assert all(p.stat().st_uid == uid for p in container.cache.rglob("*"))
    report(f"tuning cache in the compose volume {container.cache_target}: "
           f"{', '.join(str(p.relative_to(container.cache)) for p in tuned)}")  # fmt: skip


def v1_top(http: httpx.Client | TestClient, photo: Path) -> dict[str, Any]:
    res = http.post(f"/v1/models/{DEFAULT_MODEL}/classify",
                    params={"views": VIEWS, "top_k": 5},
                    files={"images": (photo.name, photo.read_bytes(), "image/jpeg")})  # fmt: skip
    assert res.status_code == 200, res.text
    result = res.json()["results"][0]
    assert result["views"] == 10
    return dict(result["top"][0])


def v2_top(http: httpx.Client, photo: Path) -> tuple[int, float]:
    body = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"content_type": "base64"},
                    "data": [base64.b64encode(photo.read_bytes()).decode()]}],
        "parameters": {"views": VIEWS},
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    }  # fmt: skip
    res = http.post(f"/v2/models/{DEFAULT_MODEL}/infer", json=body)
    assert res.status_code == 200, res.text
    out = {o["name"]: o for o in res.json()["outputs"]}["probabilities"]
    prob, index, _ = out["data"][0].split(":", 2)
    return int(index), float(prob)


def test_classifies_a_shared_photo_as_the_checkout_does(
    container: Container, report: Report
) -> None:
    photo = sample_files()[0]
    with client(container.base) as http:
        inside = v1_top(http, photo)
        v2_index, v2_prob = v2_top(http, photo)
    outside_settings = Settings(models=[DEFAULT_MODEL], models_dir=default_models_dir(),
                                device="cpu", dtype="float32", threads=1, tune=False)  # fmt: skip
    with in_process_app(outside_settings) as app:
        outside = v1_top(app, photo)
    report(f"{photo.name}, views {VIEWS}: top-1 inside the image /v1 {inside['index']} "
           f"{inside['label']!r} p={inside['prob']:.4f}, /v2 {v2_index} p={v2_prob:.4f}; "
           f"outside /v1 {outside['index']} p={outside['prob']:.4f}")  # fmt: skip
    assert inside["index"] == outside["index"] == v2_index
    assert inside["synset"] == photo.name.split("_")[0]
    assert abs(v2_prob - inside["prob"]) < 1e-4  # one server, the same views
    # the image may run another numeric path (the tuner's choice on this CPU)
    assert abs(inside["prob"] - outside["prob"]) < 0.05


def test_metrics_count_what_was_served(container: Container, report: Report) -> None:
    with client(container.base) as http:
        v1_top(http, sample_files()[1])
        samples = scrape(http)
    assert total(samples, "midserve_model_ready", model=DEFAULT_MODEL) == 1
    assert total(samples, "midserve_images_total", model=DEFAULT_MODEL) >= 1
    classify = "/v1/models/{model}/classify"
    assert total(samples, "midserve_requests_total", route=classify, status="200") >= 1
    plans = [k for k in samples if k.startswith("midserve_forward_plan_info{")]
    assert plans, "no forward plan exported"
    report(f"/metrics: {len(samples)} samples; {plans[0]}")


def test_healthcheck_passes_while_ready_then_a_stop_is_graceful_and_it_fails(
    container: Container, image: Built, buildah: Buildah, tools: dict[str, str]
) -> None:
    assert healthcheck_exec(tools["nsenter"], container, image.config) == 0
    assert stop(container) == 0, "the server did not exit cleanly on SIGTERM"
    # stopped: the same command, in the container's network, must now report unhealthy
    after = container_run(buildah, container.netns, container.name,
                          healthcheck_command(image.config))  # fmt: skip
    assert subprocess.run(after, capture_output=True, timeout=60).returncode != 0
