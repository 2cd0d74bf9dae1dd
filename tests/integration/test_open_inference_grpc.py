"""The Open Inference Protocol over gRPC against a real server (MIDSERVE_GRPC_PORT), with the
official Triton gRPC client: health, metadata, infer with JPEGs as BYTES in
raw_input_contents, class_count, the bearer token in the metadata, and /v1's answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.serve_process import free_port
from tests.helpers import image_bytes
from tests.server import running_server

grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is not installed (the dev extra has it)"
)
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "grpc-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
VIEWS, SEED = "fixed:5,random:3", 11


GRPC_BIND_FAILED = "Failed to bind to address"  # grpc's words when its port was taken
START_TRIES = 3


@pytest.fixture(scope="module")
def servers(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A server with gRPC on a free port. The port is chosen before the server binds it,
    seconds later (imports, model load): another socket can take it meanwhile, and then
    only that start is tried again, on new ports; any other start failure fails the test."""
    with contextlib.ExitStack() as stack:
        for attempt in range(START_TRIES):
            port = free_port()
            env = {"MIDSERVE_GRPC_PORT": str(port), "MIDSERVE_AUTH_TOKENS": f'["{TOKEN}"]'}
            log = tmp_path_factory.mktemp("grpc") / "server.log"  # its tail is in a failure
            try:
                base = stack.enter_context(running_server(tiny_repo, env=env, log_path=log))
                break
            except RuntimeError as exc:
                if GRPC_BIND_FAILED not in str(exc) or attempt == START_TRIES - 1:
                    raise
        yield base, f"127.0.0.1:{port}"


def test_grpc_matches_v1(servers: tuple[str, str]) -> None:
    base, target = servers
    client = grpcclient.InferenceServerClient(target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny", headers=AUTH, as_json=True)
    assert meta["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": ["-1"]}
    images = [image_bytes(100 + 20 * i, 90, fmt="JPEG", seed=i) for i in range(2)]
    inp = grpcclient.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))
    outputs = [
        grpcclient.InferRequestedOutput("probabilities"),
        grpcclient.InferRequestedOutput("views"),
    ]
    params = {"views": VIEWS, "seed": SEED}
    result = client.infer("tiny", [inp], outputs=outputs, parameters=params, headers=AUTH)
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 10) and result.as_numpy("views").tolist() == [8, 8]
    top3 = [grpcclient.InferRequestedOutput("probabilities", class_count=3)]
    classes = client.infer("tiny", [inp], outputs=top3, parameters=params, headers=AUTH)
    for row, labels, data in zip(probs, classes.as_numpy("probabilities"), images, strict=True):
        res = httpx.post(
            f"{base}/v1/models/tiny/classify",
            params={"views": VIEWS, "seed": SEED, "top_k": 3},
            files={"images": ("a.jpg", data, "image/jpeg")},
            headers=AUTH,
            timeout=60,
        )
        top = res.json()["results"][0]["top"]
        assert [t["index"] for t in top] == np.argsort(-row)[:3].tolist()
        assert [int(c.decode().split(":")[1]) for c in labels] == [t["index"] for t in top]
        assert row[top[0]["index"]] == pytest.approx(top[0]["prob"], abs=1e-4)


@pytest.mark.parametrize(
    ("model", "data", "headers", "code"),
    [
        ("tiny", b"not an image", AUTH, "INVALID_ARGUMENT"),
        ("nope", b"x", AUTH, "NOT_FOUND"),
        ("tiny", b"x", {}, "UNAUTHENTICATED"),
    ],
    ids=["not-an-image", "unknown-model", "no-token"],
)
def test_grpc_errors(
    servers: tuple[str, str], model: str, data: bytes, headers: dict, code: str
) -> None:
    client = grpcclient.InferenceServerClient(servers[1])
    inp = grpcclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([data], dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [inp], headers=headers)
    assert code in str(err.value.status())
