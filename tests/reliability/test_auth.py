"""Bearer-token authentication: classify and model endpoints need a token when tokens are set;
probes and /metrics stay open unless MIDSERVE_OPEN_PROBES=false; tokens come from the
environment or a file; every configured token is compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.helpers import image_bytes
from tests.inprocess import in_process_app, tiny_settings

CLASSIFY = "/v1/models/tiny/classify"
PNG = {"content-type": "image/png"}
TOKENS = ["first-token-3f9a", "second-token-77c1"]


@pytest.fixture(scope="module")
def token_server(tiny_repo: Path) -> Iterator[TestClient]:
    """Tokens from the environment (a JSON list), probes open (the default); the real app
    in process (tests/inprocess.py)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MIDSERVE_AUTH_TOKENS", '["first-token-3f9a","second-token-77c1"]')
        settings = tiny_settings(tiny_repo)
    assert settings.auth_tokens == TOKENS
    with in_process_app(settings) as client:
        yield client


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "headers",
    [{}, _bearer("wrong"), {"authorization": "Bearer"}, {"authorization": TOKENS[0]},
     {"authorization": f"Basic {TOKENS[0]}"}, _bearer(TOKENS[0] + "x"), _bearer(TOKENS[0][:-1])],
    ids=["none", "wrong", "empty", "no scheme", "basic scheme", "longer", "prefix"],
)  # fmt: skip
def test_classify_and_models_refuse_without_a_valid_token(
    token_server: TestClient, headers: dict[str, str]
) -> None:
    for method, path in (("POST", CLASSIFY), ("GET", "/v1/models"), ("GET", "/v1/models/tiny")):
        res = token_server.request(method, path, content=image_bytes(),
                                   headers={**PNG, **headers})  # fmt: skip
        assert res.status_code == 401, (path, res.text)
        assert res.json()["error"]["type"] == "unauthorized"
        assert res.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("token", TOKENS)
def test_every_configured_token_works(token_server: TestClient, token: str) -> None:
    res = token_server.post(CLASSIFY, content=image_bytes(), headers={**PNG, **_bearer(token)})
    assert res.status_code == 200 and res.json()["results"][0]["top"]
    assert token_server.get("/v1/models", headers=_bearer(token)).status_code == 200


def test_probes_and_metrics_stay_open_by_default(token_server: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert token_server.get(path).status_code == 200, path


def _app(tmp_path: Path, tiny_repo: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(models=["tiny"], models_dir=tiny_repo, device="cpu",
                                          warmup=False, **settings)))  # fmt: skip


def test_token_file_and_closed_probes(tmp_path: Path, tiny_repo: Path) -> None:
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("# one token per line\n\nfile-token-a1\n  file-token-b2  \n")
    with _app(tmp_path, tiny_repo, auth_tokens_file=token_file, open_probes=False) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
            assert client.get(path).status_code == 401, path
        for token in ("file-token-a1", "file-token-b2"):
            assert client.get("/healthz", headers=_bearer(token)).status_code == 200
            assert client.get("/metrics", headers=_bearer(token)).status_code == 200
        assert client.get("/healthz", headers=_bearer("# one token per line")).status_code == 401


def test_no_tokens_means_no_authentication(tmp_path: Path, tiny_repo: Path) -> None:
    with _app(tmp_path, tiny_repo) as client:
        assert client.get("/v1/models").status_code == 200


def test_every_token_is_compared_in_constant_time(
    tmp_path: Path, tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hmac.compare_digest against each configured token, with no early exit on a match."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    tokens = ["alpha-token", "beta-token", "gamma-token"]
    with _app(tmp_path, tiny_repo, auth_tokens=tokens) as client:
        for given, status in (("beta-token", 200), ("nope", 401), ("alpha-token", 200)):
            calls.clear()
            assert client.get("/v1/models", headers=_bearer(given)).status_code == status
            assert [b for _, b in calls] == [t.encode() for t in tokens]
            assert all(a == given.encode() for a, _ in calls)


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_the_api_docs_need_the_token_when_tokens_are_set(
    token_server: TestClient, path: str
) -> None:
    refused = token_server.get(path)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["type"] == "unauthorized"
    assert token_server.get(path, headers=_bearer(TOKENS[1])).status_code == 200


def test_public_docs_keeps_the_api_docs_open_beside_the_tokens(tiny_repo: Path) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MIDSERVE_AUTH_TOKENS", '["only-token"]')
        env.setenv("MIDSERVE_PUBLIC_DOCS", "true")
        settings = tiny_settings(tiny_repo)
    with in_process_app(settings) as client:
        assert client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200
        assert client.post(CLASSIFY, content=image_bytes(64, 64), headers=PNG).status_code == 401
