"""/v1, the Open Inference Protocol over REST and over gRPC report one health: the same
liveness, readiness and model readiness in every state a model goes through (loading,
ready, recovering from a stalled forward, past its recovery limit, failed to load, waiting
on a later-stage model its policies cascade to), and the same token rules for their probes
(``open_probes`` true and false).

The real app in process, its gRPC server on a free port of 127.0.0.1, the official gRPC
client; the states are made by the fault-injection setting (app/serving/faults.py)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.model_config import load_model_config, write_model_config
from app.serving.faults import FaultInjector
from app.tta.stages import parse_policy
from tests.helpers import image_bytes, make_tiny_model
from tests.inprocess import app_with_grpc, wait_until_ready

grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is not installed (the dev extra has it)"
)
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "edge-token"
Health = dict[str, bool]


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


def cascading_repo(root: Path, tiny_repo: Path, later: str) -> Path:
    """tiny, whose ``auto`` policy runs a second stage on ``later``, and tiny2 (same
    classes, its own size and weights)."""
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    make_tiny_model(root, "tiny2", input_size=80, crop_pct=0.875, seed=1, interpolation="bicubic")
    cfg = load_model_config(root / "tiny")
    auto = f"center|margin<1|{later}:center"
    write_model_config(cfg.with_changes(default_views="auto", auto_views=auto), root / "tiny")
    return root


def test_a_later_stage_model_is_served_first_and_ready_with_it(
    tmp_path: Path, tiny_repo: Path
) -> None:
    repo = cascading_repo(tmp_path, tiny_repo, "tiny2")
    with app_with_grpc(repo, models=["tiny"]) as (client, grpc):  # tiny2 is not listed
        ready = client.get("/readyz").json()
        assert list(ready["models"]) == ["tiny2", "tiny"]  # loaded before the model needing it
        assert all(m["state"] == "ready" for m in ready["models"].values())
        for model in ("tiny", "tiny2"):
            agree(every_edge(client, grpc, model), live=True, ready=True, model_ready=True)
        files = {"images": ("a.png", image_bytes(100, 80, seed=2), "image/png")}
        result = client.post("/v1/models/tiny/classify", files=files).json()["results"][0]
        assert result["policy"] == "auto" and result["spec"] == "center:1|margin<1|tiny2:center:1"
        assert result["answered_by"] == ["tiny", "tiny2"]


def test_a_later_stage_model_that_failed_to_load(tmp_path: Path, tiny_repo: Path) -> None:
    repo = cascading_repo(tmp_path, tiny_repo, "broken")
    shutil.copytree(tiny_repo / "tiny", repo / "broken")
    (repo / "broken" / "weights.safetensors").unlink()
    with app_with_grpc(repo, wait_ready=False, models=["tiny"]) as (client, grpc):
        slots = client.app.state.service.slots  # type: ignore[attr-defined]
        wait_for(lambda: "tiny" in slots and slots["tiny"].state == "ready", "tiny not loaded")
        ready = client.get("/readyz")
        assert ready.status_code == 503
        models = ready.json()["models"]
        assert models["broken"]["state"] == "failed"
        assert models["tiny"]["state"] == "failed"  # it cannot answer its own policy
        assert "later-stage model 'broken' is failed" in models["tiny"]["error"]
        listed = client.get("/v1/models/tiny").json()  # the listing says what readiness says
        assert listed["state"] == "failed" and listed["stage_models"] == ["broken"]
        assert "later-stage model 'broken'" in listed["error"]
        assert parse_policy(listed["auto_views"]).models == ["broken"]
        agree(every_edge(client, grpc, "tiny"), live=True, ready=False, model_ready=False)
        why = client.get("/v2/models/tiny/ready").json()["error"]
        assert "later-stage model 'broken'" in why
        # its own views still run; its policy, which needs broken, is refused as a whole
        files = {"images": ("a.png", image_bytes(100, 80, seed=2), "image/png")}
        plain = client.post("/v1/models/tiny/classify?views=center", files=files)
        assert plain.status_code == 200 and plain.json()["results"][0]["answered_by"] == ["tiny"]
        auto = client.post("/v1/models/tiny/classify", files=files)
        assert auto.status_code == 503, auto.text
        assert "model 'broken' is not ready" in auto.json()["error"]["message"]


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
