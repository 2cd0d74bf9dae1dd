"""/v1, the Open Inference Protocol over REST and over gRPC report one health: the same
liveness, readiness and model readiness in every state a model goes through (loading,
ready, recovering from a stalled forward, past its recovery limit, failed to load), and the
same token rules for their probes (``open_probes`` true and false).

The real app in process, its gRPC server on a free port of 127.0.0.1, the official gRPC
client; the states are made by the fault-injection setting (app/serving/faults.py)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.serve_process import free_port
from app.serving.faults import FaultInjector
from tests.helpers import image_bytes
from tests.inprocess import in_process_app, tiny_settings, wait_until_ready

grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is not installed (the dev extra has it)"
)
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "edge-token"
Health = dict[str, bool]


@contextlib.contextmanager
def app_with_grpc(
    repo: Path, *, wait_ready: bool = True, **settings: Any
) -> Iterator[tuple[TestClient, Any]]:
    """The app and a gRPC client of its gRPC port. A port taken between ``free_port`` and
    the bind is tried again on a new one."""
    for attempt in range(3):
        port = free_port()
        try:
            with in_process_app(
                tiny_settings(repo, grpc_port=port, grpc_host="127.0.0.1", **settings),
                wait_ready=wait_ready,
            ) as client:
                yield client, grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
                return
        except RuntimeError as exc:
            if "bind" not in str(exc).lower() or attempt == 2:
                raise


def injector(client: TestClient) -> FaultInjector:
    faults = client.app.state.service.slots["tiny"].faults  # type: ignore[attr-defined]
    assert faults is not None
    return faults


def v1_health(client: TestClient, model: str, headers: dict[str, str]) -> Health:
    ready = client.get("/readyz", headers=headers)
    return {
        "live": client.get("/healthz", headers=headers).status_code == 200,
        "ready": ready.status_code == 200,
        "model_ready": ready.json()["models"][model]["state"] == "ready",
    }


def v2_health(client: TestClient, model: str, headers: dict[str, str]) -> Health:
    live = client.get("/v2/health/live", headers=headers)
    ready = client.get("/v2/health/ready", headers=headers)
    model_ready = client.get(f"/v2/models/{model}/ready", headers=headers)
    assert live.json()["live"] is (live.status_code == 200)
    return {
        "live": live.status_code == 200,
        "ready": ready.status_code == 200,
        "model_ready": model_ready.status_code == 200,
    }


def grpc_health(grpc: Any, model: str, headers: dict[str, str]) -> Health:
    return {
        "live": grpc.is_server_live(headers=headers),
        "ready": grpc.is_server_ready(headers=headers),
        "model_ready": grpc.is_model_ready(model, headers=headers),
    }


def every_edge(
    client: TestClient, grpc: Any, model: str = "tiny", headers: dict[str, str] | None = None
) -> dict[str, Health]:
    headers = headers or {}
    return {
        "v1": v1_health(client, model, headers),
        "v2": v2_health(client, model, headers),
        "grpc": grpc_health(grpc, model, headers),
    }


def agree(answers: dict[str, Health], **expected: bool) -> None:
    assert answers["v1"] == answers["v2"] == answers["grpc"], answers
    assert answers["v1"] == expected, answers


def wait_for(check: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def post(client: TestClient) -> int:
    data = image_bytes(96, 80, fmt="JPEG", seed=1)
    files = {"images": ("a.jpg", data, "image/jpeg")}
    return client.post("/v1/models/tiny/classify?crops=1", files=files).status_code


def test_loading_then_ready(tiny_repo: Path) -> None:
    with app_with_grpc(tiny_repo, wait_ready=False, fault_injection="hangload") as (client, grpc):
        wait_for(lambda: client.app.state.service.slots.get("tiny") is not None, "no slot")  # type: ignore[attr-defined]
        agree(every_edge(client, grpc), live=True, ready=False, model_ready=False)
        assert client.get("/readyz").json()["models"]["tiny"]["state"] == "loading"
        injector(client).release()
        wait_until_ready(client)
        agree(every_edge(client, grpc), live=True, ready=True, model_ready=True)


def test_recovering_from_a_stalled_forward(tiny_repo: Path) -> None:
    # forward 1 stalls past the watchdog; the recovery probe (forward 2) hangs; no limit
    with app_with_grpc(
        tiny_repo, fault_injection="hang@1,hang@2", forward_timeout_s=0.3, recovery_limit_s=0
    ) as (client, grpc):
        assert post(client) == 503
        assert client.get("/readyz").json()["models"]["tiny"]["state"] == "recovering"
        agree(every_edge(client, grpc), live=True, ready=False, model_ready=False)
        injector(client).release()
        wait_until_ready(client)
        agree(every_edge(client, grpc), live=True, ready=True, model_ready=True)


def test_past_the_recovery_limit(tiny_repo: Path) -> None:
    with app_with_grpc(
        tiny_repo, fault_injection="hang@1,hang@2", forward_timeout_s=0.3, recovery_limit_s=0.5
    ) as (client, grpc):
        assert post(client) == 503
        wait_for(lambda: client.get("/healthz").status_code == 503, "liveness did not fail")
        agree(every_edge(client, grpc), live=False, ready=False, model_ready=False)
        injector(client).release()
        wait_until_ready(client)
        agree(every_edge(client, grpc), live=True, ready=True, model_ready=True)


def test_a_model_that_failed_to_load(tmp_path: Path, tiny_repo: Path) -> None:
    shutil.copytree(tiny_repo / "tiny", tmp_path / "tiny")
    shutil.copytree(tiny_repo / "tiny", tmp_path / "broken")
    (tmp_path / "broken" / "weights.safetensors").write_bytes(b"garbage")
    with app_with_grpc(tmp_path, wait_ready=False, models=["tiny", "broken"]) as (client, grpc):
        wait_for(
            lambda: client.get("/readyz").json()["models"]["broken"]["state"] == "failed",
            "the broken model did not fail",
        )
        wait_for(
            lambda: client.get("/readyz").json()["models"]["tiny"]["state"] == "ready",
            "the good model did not load",
        )
        agree(every_edge(client, grpc, "broken"), live=True, ready=False, model_ready=False)
        agree(every_edge(client, grpc, "tiny"), live=True, ready=False, model_ready=True)


def refused(call: Callable[[], Any]) -> str:
    """The gRPC status a call was refused with ('' when it was answered)."""
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    return ""


@pytest.mark.parametrize("open_probes", [True, False])
def test_token_rules_for_probes_agree(tiny_repo: Path, open_probes: bool) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    with app_with_grpc(
        tiny_repo, wait_ready=False, auth_tokens=[TOKEN], open_probes=open_probes
    ) as (client, grpc):
        wait_for(lambda: client.get("/readyz", headers=auth).status_code == 200, "not ready")
        # with the token every probe answers on every edge
        agree(every_edge(client, grpc, headers=auth), live=True, ready=True, model_ready=True)
        rest = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready",
                "/v2/models/tiny/ready"]  # fmt: skip
        statuses = {client.get(path).status_code for path in rest}
        grpc_codes = {
            refused(grpc.is_server_live),
            refused(grpc.is_server_ready),
            refused(lambda: grpc.is_model_ready("tiny")),
        }
        if open_probes:
            assert statuses == {200} and grpc_codes == {""}
        else:
            assert statuses == {401} and grpc_codes == {"StatusCode.UNAUTHENTICATED"}
        # metadata and infer need the token whatever open_probes says
        assert client.get("/v2").status_code == 401
        assert client.get("/v1/models").status_code == 401
        assert refused(grpc.get_server_metadata) == "StatusCode.UNAUTHENTICATED"
