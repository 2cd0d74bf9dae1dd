"""Fuzzing: the view-spec parser and the image decoder take anything and answer with a result
or a domain error; schemathesis drives the live server from its own OpenAPI schema and must
never get a 5xx."""

from __future__ import annotations

import io
import os

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import ImageTooLargeError, InvalidImageError, InvalidRequestError
from app.tta.decode import decode_image
from app.tta.limits import DecodeLimits
from app.tta.views import (
    AUTO_SPEC,
    KINDS,
    MAX_PER_KIND,
    MAX_VIEW_SIZE,
    MIN_VIEW_SIZE,
    parse_view_spec,
    split_kind,
)
from tests.helpers import image_bytes

FUZZ_CASES = int(os.environ.get("MIDSERVE_FUZZ_CASES", "25"))  # per API operation
SMALL = DecodeLimits(max_pixels=1_000_000, max_aspect_ratio=16.0)

spec_text = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["auto", "AUTO", " Auto ", "auto,fixed:5", "auto:3"]),
    st.lists(
        st.tuples(st.sampled_from([*KINDS, "zoom", "", " Random ", "full@96", "fixed@15"]),
                  st.sampled_from(["", ":", ":0", ":1", ":3", ":5", ":-2", ":x", ": 7", ":99"])),
        max_size=6,
    ).map(lambda items: ",".join(k + c for k, c in items)),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(spec_text)
@example("AUTO")  # the adaptive policy: valid with no parts (resolved per image)
@example("full@288,mfull@288:1")
def test_view_spec_parser_returns_a_valid_spec_or_a_domain_error(text: str) -> None:
    try:
        spec = parse_view_spec(text)
    except InvalidRequestError as exc:
        assert str(exc)
        return
    if spec.adaptive:  # ``auto``: no parts of its own, resolved per image
        assert text.strip().lower() == "auto"
        assert spec == AUTO_SPEC and spec.parts == () and str(spec) == "auto"
    else:
        assert spec.total >= 1 and len({k for k, _ in spec.parts}) == len(spec.parts)
    for token, count in spec.parts:
        kind, size = split_kind(token)
        assert kind in KINDS and 1 <= count <= MAX_PER_KIND.get(kind, 10**6)
        assert size == 0 or MIN_VIEW_SIZE <= size <= MAX_VIEW_SIZE
    assert parse_view_spec(str(spec)) == spec  # its text form parses back to itself


def _seeds() -> list[bytes]:
    img = Image.open(io.BytesIO(image_bytes(24, 18))).convert("RGB")
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data[: max(1, len(data) - cut)])
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf)


image_like = st.one_of(
    st.binary(max_size=2048),
    st.builds(_mutate, st.sampled_from(_seeds()),
              st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=8),
              st.integers(0, 200)),
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_like)
def test_decoder_returns_an_rgb_image_or_a_domain_error(data: bytes) -> None:
    try:
        img, fmt, _ = decode_image(data, SMALL)
    except (InvalidImageError, ImageTooLargeError) as exc:
        assert str(exc)
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1 and fmt
    assert img.width * img.height <= SMALL.max_pixels


schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(strict_server: str) -> None:
    schema = schemathesis.openapi.from_url(strict_server + "/openapi.json")
    seen: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=FUZZ_CASES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            label = f"{case.method} {case.path}"
            res = case.call(base_url=strict_server, timeout=60)
            seen[label] = seen.get(label, 0) + 1
            if res.status_code >= 500:
                failures.append(f"{label}: {res.status_code} {res.text[:200]}")

        run()
    print(f"\nschemathesis: {sum(seen.values())} requests over {len(seen)} operations: {seen}")
    assert not failures, failures
    assert len(seen) >= 5 and sum(seen.values()) >= 5 * min(FUZZ_CASES, 5)
    assert httpx.get(strict_server + "/healthz").status_code == 200
