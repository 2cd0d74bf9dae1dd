"""Replicas behind nginx: one is killed (SIGKILL) or stopped (SIGTERM) under load, and no
accepted request is lost; restarted on its port, it is given requests again.

Three real replicas of the tiny model, a real nginx in front of them with the proxy settings
that ship (docker/nginx/midserve.conf, its upstream pointed at the replicas' loopback
ports, and docker/nginx/midserve-proxy.conf unchanged), and 8 clients posting the same
seeded classify request (idempotent: every replica gives the same answer) for the whole
test. A client that gets a 503 retries once after its Retry-After. The counts go to the
test's output and to artifacts/failover.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.serve_process import HOST, free_port, running_process
from tests.deploy.tools import MISSING, find_tool
from tests.helpers import PROJECT_ROOT, image_bytes
from tests.server import scrape, server_process, total

NGINX_DIR = PROJECT_ROOT / "docker" / "nginx"
CLASSIFY = "/v1/models/tiny/classify?views=center,random:2&seed=7"
CLASSIFY_ROUTE = "/v1/models/{model}/classify"
BODY = image_bytes(64, 64, seed=3)
HEADERS = {"content-type": "image/png"}
CLIENTS = 8
REPLICAS = 3
REPORT = PROJECT_ROOT / "artifacts" / "failover.md"


@dataclass
class Replica:
    """One midserve replica on a fixed port, so that it can come back where nginx expects it."""

    models_dir: Path
    log_dir: Path
    name: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _stack: contextlib.ExitStack | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def logs(self) -> list[Path]:
        return sorted(self.log_dir.glob(f"{self.name}-*.log"))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """(Re)start on the same port; return once /readyz answers 200."""
        self.stop()
        self.starts += 1
        stack = contextlib.ExitStack()
        log = self.log_dir / f"{self.name}-{self.starts}.log"
        _, self.proc = stack.enter_context(server_process(self.models_dir, log_path=log,
                                                          port=self.port))  # fmt: skip
        self._stack = stack

    def stop(self) -> None:
        """SIGTERM and wait (nothing to do for a process that is already gone)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def classify_200s(self) -> float:
        return total(scrape(self.base), "midserve_requests_total", route=CLASSIFY_ROUTE,
                     status="200")  # fmt: skip


@pytest.fixture(scope="module")
def replicas(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    if find_tool("nginx") is None:
        pytest.skip(MISSING["nginx"])
    log_dir = tmp_path_factory.mktemp("replicas")
    pool = [Replica(tiny_repo, log_dir, f"replica{i}") for i in range(REPLICAS)]
    try:
        with ThreadPoolExecutor(REPLICAS) as ex:  # starting is mostly imports: overlap them
            for fut in [ex.submit(r.start) for r in pool]:
                fut.result()
        yield pool
    finally:
        with ThreadPoolExecutor(REPLICAS) as ex:  # each drains for a few seconds: overlap
            list(ex.map(Replica.stop, pool))
    for r in pool:
        for log in r.logs:
            assert "Traceback" not in log.read_text(), f"{log.name}:\n{log.read_text()[-3000:]}"


def render_nginx(tmp: Path, upstreams: list[str], port: int) -> Path:
    """A top-level nginx.conf under ``tmp`` that includes the shipped server block, its
    upstream swapped for ``upstreams`` (host:port) and its listen for ``port``; the shipped
    proxy settings are included from the repository as they are."""
    shipped = (NGINX_DIR / "midserve.conf").read_text()
    server_line = re.compile(r"^(\s*)server midserve:8000( [^;]*)?;$", re.MULTILINE)
    match = server_line.search(shipped)
    assert match and shipped.count("listen 8000;") == 1, "docker/nginx/midserve.conf changed"
    indent, params = match.group(1), match.group(2) or ""
    servers = "\n".join(f"{indent}server {addr}{params};" for addr in upstreams)
    local = server_line.sub(lambda _: servers, shipped)
    local = local.replace("listen 8000;", f"listen {HOST}:{port};")
    (tmp / "midserve.conf").write_text(local)
    (tmp / "midserve-proxy.conf").symlink_to(NGINX_DIR / "midserve-proxy.conf")
    temp = tmp / "temp"
    temp.mkdir()
    temp_paths = "\n".join(
        f"    {kind}_temp_path {temp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # as root, workers would switch to "nobody", who cannot write the temp files under tmp
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 2;\ndaemon off;\npid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} warn;\nevents {{ worker_connections 512; }}\n"
        "http {\n"
        "    log_format failover '$msec $request_method $request_uri $status "
        '"$upstream_addr" "$upstream_status"\';\n'
        f"    access_log {tmp / 'access.log'} failover;\n{temp_paths}\n"
        "    include midserve.conf;\n}\n"
    )
    return conf


@dataclass
class Balancer:
    url: str
    access_log: Path
    error_log: Path


@contextlib.contextmanager
def running_nginx(tmp: Path, upstreams: list[str]) -> Iterator[Balancer]:
    """nginx with the shipped configuration in front of ``upstreams``, until the block ends."""
    nginx = find_tool("nginx")
    if nginx is None:
        pytest.skip(MISSING["nginx"])
    port = free_port()
    conf = render_nginx(tmp, upstreams, port)
    url = f"http://{HOST}:{port}"
    cmd = [nginx, "-p", str(tmp), "-c", str(conf)]
    with running_process(cmd, url + "/nginx-health", log_path=tmp / "nginx.out",
                         name="nginx", ready_timeout_s=30):  # fmt: skip
        yield Balancer(url, tmp / "access.log", tmp / "error.log")


@pytest.fixture
def balancer(replicas: list[Replica], tmp_path: Path) -> Iterator[Balancer]:
    """A fresh nginx (no failure counts carried over) in front of every replica, all up."""
    for r in replicas:
        if not r.running():
            r.start()
    with running_nginx(tmp_path, [r.addr for r in replicas]) as lb:
        yield lb


@dataclass
class Load:
    """CLIENTS threads posting the seeded classify request through nginx until stopped."""

    url: str
    counts: Counter[str] = field(default_factory=Counter)
    answers: list[tuple[int, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def post(self, client: httpx.Client) -> httpx.Response | None:
        self.count("attempts")
        try:
            return client.post(CLASSIFY, content=BODY, headers=HEADERS)
        except httpx.HTTPError as exc:
            self.problem(f"transport error: {exc!r}")
            return None

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def problem(self, what: str) -> None:
        with self._lock:
            self.problems.append(what)

    def client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=90, trust_env=False) as client:
            while not self._stop.is_set():
                self.count("sent")
                try:
                    self.one_request(client)
                except Exception as exc:  # an answer of the wrong shape: counted, not fatal
                    self.problem(f"unexpected answer: {exc!r}")

    def one_request(self, client: httpx.Client) -> None:
        res = self.post(client)
        if res is not None and res.status_code == 503:
            self.count("503")
            self.count(f"503 {res.json()['error']['type']}")
            time.sleep(min(5, int(res.headers["retry-after"])))
            self.count("retried")
            res = self.post(client)
            if res is not None and res.status_code == 503:
                self.problem("503 again on the retry")
                return
        if res is None:
            return
        if res.status_code != 200:
            self.problem(f"{res.status_code}: {res.text[:200]}")
            return
        self.count("200")
        top = res.json()["results"][0]["top"][0]
        with self._lock:
            self.answers.append((top["index"], top["prob"]))

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self.client) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> float:
    """Poll ``check()`` until true; the time it took. Fails the test after ``timeout_s``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout_s, f"not within {timeout_s:g} s: {what}"
        time.sleep(poll_s)
    return time.monotonic() - t0


# the log_format of render_nginx; a request tried on two replicas has "A, B" and "502, 200"
ACCESS_LINE = re.compile(r'(?P<msec>\S+) (?P<method>\S+) (?P<uri>\S+) (?P<status>\d+) '
                         r'"(?P<addrs>[^"]*)" "(?P<statuses>[^"]*)"')  # fmt: skip


def access_entries(log: Path) -> list[tuple[float, int, list[str]]]:
    """(time, status, upstream addresses tried in order) of each classify request nginx saw."""
    out = []
    for line in log.read_text().splitlines():
        m = ACCESS_LINE.fullmatch(line)
        assert m, f"unexpected access log line: {line!r}"
        if m["uri"].startswith("/v1/models/tiny/classify"):
            tried = [a.strip() for a in m["addrs"].split(",")]
            out.append((float(m["msec"]), int(m["status"]), tried))
    return out


@pytest.fixture(scope="module")
def report() -> Iterator[list[str]]:
    rows: list[str] = []
    yield rows
    if rows:
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(
            f"# Failover: {REPLICAS} replicas behind nginx, {CLIENTS} clients, one replica "
            "killed or stopped under load, then restarted on its port "
            "(tests/reliability/test_failover.py)\n\n"
            "lost: a request that did not end in 200 after at most one retry of a 503; "
            "moved by nginx: tried on a second replica (proxy_next_upstream); marked down: "
            "nginx's 'upstream server temporarily disabled' (max_fails reached).\n\n"
            "| signal | sent | 200 | 503 (retried once) | lost | moved by nginx | answered by "
            "the victim after the signal | replica marked down | victim exit | down s | back in "
            "s after ready | test s |\n" + "|---" * 12 + "|\n" + "".join(rows)
        )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_replica_lost_under_load_loses_no_request_and_is_picked_up_again(
    sig: signal.Signals, replicas: list[Replica], balancer: Balancer, report: list[str]
) -> None:
    t_start = time.monotonic()
    victim, others = replicas[0], replicas[1:]
    reference = httpx.post(others[0].base + CLASSIFY, content=BODY, headers=HEADERS, timeout=30)
    ref_top = reference.json()["results"][0]["top"][0]

    with Load(balancer.url) as load:
        wait_for("every replica served through nginx",
                 lambda: all(r.classify_200s() >= 3 for r in replicas), 30, 0.2)  # fmt: skip
        # mid-request: the victim is working on at least one request when the signal comes
        in_flight = lambda: total(scrape(victim.base), "midserve_in_flight_requests") >= 1  # noqa: E731
        wait_for("a request in flight on the victim", in_flight, 10)
        assert victim.proc is not None
        victim.proc.send_signal(sig)
        t_signal = time.time()
        exit_code = victim.proc.wait(timeout=40)
        t_exit = time.time()
        exit_s = t_exit - t_signal
        victim.start()  # same port; returns once it is ready (down meanwhile: seconds)
        t_ready = time.time()
        down_s = t_ready - t_signal
        back_s = wait_for("the restarted replica serving through nginx",
                          lambda: victim.classify_200s() >= 3, 20, 0.1)  # fmt: skip
        time.sleep(0.5)
    counts = load.counts
    # nginx writes a request's log line just after its response: let the last ones land
    logged = lambda: len(access_entries(balancer.access_log)) >= counts["attempts"]  # noqa: E731
    wait_for("nginx's log of every request", logged, 5, 0.05)
    entries = access_entries(balancer.access_log)
    moved = [e for e in entries if len(e[2]) > 1]  # tried on a second replica
    by_final = Counter(e[2][-1] for e in entries if e[1] == 200)
    after_restart = [e for e in entries if e[0] > t_ready and e[2][-1] == victim.addr]
    # answered by the victim itself between the signal and its exit (SIGTERM's drain)
    drained = [e for e in entries if t_signal < e[0] <= t_exit + 0.1 and e[2] == [victim.addr]]
    disabled = balancer.error_log.read_text().count("upstream server temporarily disabled")
    lost = len(load.problems)
    test_s = time.monotonic() - t_start
    row = (
        f"| {sig.name} | {counts['sent']} | {counts['200']} | {counts['503']} "
        f"({counts['retried']} retried) | {lost} | {len(moved)} | {len(drained)} | {disabled} "
        f"| {exit_code} | {down_s:.1f} | {back_s:.1f} | {test_s:.0f} |\n"
    )
    report.append(row)
    print(
        f"\n{sig.name}: sent {counts['sent']}, 200 {counts['200']}, 503 {counts['503']} "
        f"({dict((k, v) for k, v in counts.items() if k.startswith('503 '))}), retried "
        f"{counts['retried']}, lost {lost}; nginx moved {len(moved)} to another replica, "
        f"marked a replica down {disabled} times; {len(drained)} answered by the victim "
        f"after the signal; "
        f"200s by replica {dict(by_final)}; victim exit {exit_code} after {exit_s:.1f} s, "
        f"down (until ready again) {down_s:.1f} s, back through nginx "
        f"{back_s:.1f} s after ready; test {test_s:.0f} s"
    )

    assert load.problems == [], load.problems[:10]
    assert counts["200"] == counts["sent"] and counts["retried"] == counts["503"]
    assert len(entries) == counts["attempts"], "nginx saw a different number of requests"
    # idempotent: the same answer whichever replica gave it (float tolerance: each replica's
    # tuner may pick another backend)
    assert {i for i, _ in load.answers} == {ref_top["index"]}
    assert max(abs(p - ref_top["prob"]) for _, p in load.answers) < 1e-3
    assert after_restart, "nginx never sent the restarted replica a request"
    assert all(by_final[r.addr] > 0 for r in replicas)
    if sig == signal.SIGTERM:
        assert exit_code == 0  # drained, then a clean exit
        assert counts["503"] == 0, "a graceful stop should cost no client a retry"
    else:
        assert exit_code == -signal.SIGKILL
        # the first requests nginx sent the dead replica (in flight, or refused) went on
        assert any(e[2][0] == victim.addr for e in moved)


def test_no_replica_reachable_is_a_retryable_503_not_a_502(tmp_path: Path) -> None:
    """When no try reaches a replica, the client gets midserve's error shape with a
    Retry-After, as for a full queue, instead of nginx's HTML 502."""
    nobody = [f"{HOST}:{free_port()}" for _ in range(2)]  # nothing listens there
    with running_nginx(tmp_path, nobody) as lb:
        res = httpx.post(lb.url + CLASSIFY, content=BODY, headers=HEADERS, timeout=30,
                         trust_env=False)  # fmt: skip
        health = httpx.get(lb.url + "/readyz", timeout=30, trust_env=False)
    assert res.status_code == 503 and res.headers["retry-after"] == "1"
    assert res.json()["error"]["type"] == "no_replica"
    assert health.status_code == 503
    tried = access_entries(lb.access_log)[0][2]
    assert sorted(tried) == sorted(nobody)  # both replicas were tried before giving up
