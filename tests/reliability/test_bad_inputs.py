"""Every row of the bad-input table against a live server: the answer it must get, and the
server still healthy afterwards. The statuses received are written to artifacts/bad_inputs.md."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import PROJECT_ROOT, image_bytes
from tests.reliability.bad_inputs import CLASSIFY, Answer, Case, build_cases

CASES = build_cases()
RECEIVED: dict[str, Answer] = {}
REPORT = PROJECT_ROOT / "artifacts" / "bad_inputs.md"


def _message(answer: Answer) -> str:
    if isinstance(answer.body, dict) and "error" in answer.body:
        return str(answer.body["error"]["message"])
    if isinstance(answer.body, dict):
        top1 = answer.body["results"][0]["top"][0]["index"]
        return f"classified: top-1 class {top1}"
    return str(answer.body)


def write_report(cases: list[Case], received: dict[str, Answer]) -> str:
    lines = [
        "# Bad inputs and what the server answered",
        "",
        f"{len(received)} of {len(cases)} kinds sent to a live server "
        "(`pytest tests/reliability/test_bad_inputs.py`).",
        "",
        "| # | input | expected | got | error type | message |",
        "|---|---|---|---|---|---|",
    ]
    for i, case in enumerate(cases, 1):
        got = received.get(case.name)
        if got is None:
            continue
        kind = (
            got.body["error"]["type"] if isinstance(got.body, dict) and "error" in got.body else ""
        )
        msg = _message(got).replace("|", "\\|")[:110]
        note = f" ({case.note})" if case.note else ""
        lines.append(f"| {i} | {case.name} | {case.status} | {got.status} | {kind} | {msg}{note} |")
    text = "\n".join(lines) + "\n"
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text)
    return text


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    if RECEIVED:
        print("\n" + write_report(CASES, RECEIVED))


@pytest.mark.slow  # a real server (its socket: raw HTTP, slow uploads)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_answer_and_the_server_stays_healthy(
    strict_server: str, case: Case
) -> None:
    answer = case.send(strict_server)
    RECEIVED[case.name] = answer
    assert answer.status == case.status, answer.body
    if case.status == 200:
        assert case.check is not None
        case.check(strict_server, answer)
    elif case.json_error:
        assert answer.content_type.startswith("application/json"), answer.content_type
        error = answer.body["error"]
        assert error["type"] == case.kind, error
        assert case.fragment.lower() in error["message"].lower(), error
    else:
        assert case.fragment.lower() in str(answer.body).lower()
    # still healthy: the probe answers and a good image is classified
    assert httpx.get(strict_server + "/healthz", timeout=10).status_code == 200
    ok = httpx.post(
        strict_server + CLASSIFY,
        content=image_bytes(80, 60),
        headers={"content-type": "image/png"},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["results"][0]["top"]


def test_the_table_covers_at_least_30_kinds() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 30
    assert sum(c.status >= 400 for c in CASES) >= 30
