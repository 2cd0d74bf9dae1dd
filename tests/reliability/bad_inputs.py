"""The bad-input table: every kind of awkward or hostile upload and what the server must answer.

Each row is one request against a live server (tests/reliability/conftest.py sets its limits:
2 MB bodies, 4 images, 40 views, 4 Mpixel images, 1 s body-read timeout, a 10-class model).
Awkward-but-valid images (CMYK, 16-bit, palette, EXIF-rotated, animated GIF, ...) must be
classified (200); everything else must get a JSON 4xx whose message says what was wrong.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image, features

from tests.helpers import image_bytes
from tests.reliability.rawhttp import dribble, send_raw

CLASSIFY = "/v1/models/tiny/classify"
BODY_LIMIT = 2_000_000
READ_TIMEOUT_S = 1.0
MAX_PIXELS = 4_000_000


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any  # parsed JSON, or the raw text when the answer is not JSON
    closed: bool = False  # the server hung up after answering (raw-socket rows only)


@dataclass
class Case:
    name: str
    status: int
    kind: str  # the error type expected in the JSON body ("" for a 200)
    fragment: str  # must appear in the error message (case-insensitive)
    send: Callable[[str], Answer]
    check: Callable[[str, Answer], None] | None = None  # more assertions for accepted rows
    json_error: bool = True  # False: answered by uvicorn before the app sees the request
    note: str = field(default="")


# -- encoders ----------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_raw(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def decompression_bomb(side: int = 30000) -> bytes:
    """A real, fully decodable 1-bit black PNG: ~110 KB on the wire, ``side``**2 pixels."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png_raw(side, side, 1, 0, idat)


def animated_gif() -> tuple[bytes, bytes]:
    """A two-frame GIF (noise, then black) and its first frame alone as PNG."""
    first = noise(90, 70, seed=3).convert("P")
    second = Image.new("P", (90, 70), 0)
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    return gif, encode(Image.open(io.BytesIO(gif)).convert("RGB"), "PNG")


def exif_rotated() -> bytes:
    """Landscape pixels (120x60) that the EXIF orientation tag says to rotate to portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise(120, 60, seed=4), "JPEG", exif=exif)


# -- senders -----------------------------------------------------------------------------
def _answer(res: httpx.Response) -> Answer:
    ctype = res.headers.get("content-type", "")
    body: Any = res.json() if ctype.startswith("application/json") else res.text
    return Answer(res.status_code, ctype, body)


def post(
    path: str = CLASSIFY,
    *,
    content: bytes | Iterator[bytes] | None = None,
    content_type: str | None = "image/png",
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
    data: dict[str, str] | None = None,
    method: str = "POST",
) -> Callable[[str], Answer]:
    def send(base: str) -> Answer:
        headers = {} if content_type is None or files else {"content-type": content_type}
        body = content() if callable(content) else content  # generators are single-use
        res = httpx.request(
            method, base + path, content=body, files=files, data=data, headers=headers, timeout=60
        )
        return _answer(res)

    return send


def raw(
    request_line: str, body: bytes = b"", content_type: str = "image/png"
) -> Callable[[str], Answer]:
    def send(base: str) -> Answer:
        head = (
            f"{request_line} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        res = send_raw(base, head + body)
        ctype = res.headers.get("content-type", "")
        parsed: Any = res.json() if ctype.startswith("application/json") else res.body.decode()
        return Answer(res.status, ctype, parsed, res.closed)

    return send


def slow_upload(base: str) -> Answer:
    """Headers, 100 body bytes, then one byte per 0.4 s: slower than the read timeout allows."""
    res, _ = dribble(
        base, CLASSIFY, declared=10_000, first=b"x" * 100, every_s=0.4, max_s=8 * READ_TIMEOUT_S
    )
    ctype = res.headers.get("content-type", "")
    parsed: Any = res.json() if ctype.startswith("application/json") else res.body.decode()
    return Answer(res.status, ctype, parsed, res.closed)


def chunks(total: int, size: int = 100_000) -> Callable[[], Iterator[bytes]]:
    """A chunked body (no Content-Length) of ``total`` bytes."""

    def gen() -> Iterator[bytes]:
        for start in range(0, total, size):
            yield b"\xff" * min(size, total - start)

    return gen


def upload(*images: bytes, field_name: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field_name, (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]


# -- checks for accepted rows --------------------------------------------------------------
def classified(base: str, answer: Answer) -> None:
    result = answer.body["results"][0]
    assert result.get("error") is None and len(result["top"]) == 5, result
    probs = [t["prob"] for t in result["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5


def portrait_boxes(base: str, answer: Answer) -> None:
    """Orientation applied: the view boxes lie in a 60x120 (portrait) image."""
    classified(base, answer)
    boxes = [v["box"] for v in answer.body["results"][0]["view_boxes"]]
    assert max(b[2] for b in boxes) <= 60.0 + 1e-6 and max(b[3] for b in boxes) > 60.0, boxes


def same_as_first_frame(first_frame_png: bytes) -> Callable[[str, Answer], None]:
    def check(base: str, answer: Answer) -> None:
        classified(base, answer)
        alone = httpx.post(
            base + CLASSIFY + "?crops=5",
            content=first_frame_png,
            headers={"content-type": "image/png"},
            timeout=60,
        ).json()["results"][0]["top"]
        got = answer.body["results"][0]["top"]
        assert [t["index"] for t in got] == [t["index"] for t in alone]
        for a, b in zip(got, alone, strict=True):
            assert abs(a["prob"] - b["prob"]) < 1e-4

    return check


# -- the table -----------------------------------------------------------------------------
def build_cases() -> list[Case]:
    good = image_bytes(90, 70)
    jpeg = encode(noise(200, 150), "JPEG")
    png = encode(noise(200, 150), "PNG")
    rgb = noise(90, 70, seed=1)
    rgba = Image.fromarray(
        np.dstack([np.asarray(rgb), np.asarray(noise(90, 70, seed=2))[..., :1]]), "RGBA"
    )
    sixteen = Image.fromarray((np.arange(90 * 70).reshape(70, 90) * 10).astype(np.uint16))
    gif, gif_first = animated_gif()
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"
    one = upload(good)
    q = CLASSIFY + "?"

    cases = [
        # -- the body is not a usable image
        Case("not an image (text)", 422, "invalid_image", "not a recognised image",
             post(content=b"hello, I am not an image")),
        Case("empty body", 422, "invalid_image", "empty", post(content=b"")),
        Case("truncated JPEG", 422, "invalid_image", "truncated", post(content=jpeg[:700])),
        Case("truncated PNG", 422, "invalid_image", "truncated", post(content=png[:600])),
        Case("zero-size PNG (0x10 header)", 422, "invalid_image", "not a recognised image",
             post(content=png_raw(0, 10, 8, 2, zlib.compress(b"\x00" * 31)))),
        Case("1x20000 image", 422, "invalid_image", "aspect ratio",
             post(content=image_bytes(1, 20000))),
        Case("20000x1 image", 422, "invalid_image", "aspect ratio",
             post(content=image_bytes(20000, 1))),
        Case("decompression bomb (110 KB PNG, 30000x30000)", 413, "too_large", "pixels",
             post(content=decompression_bomb())),
        Case("over MIDSERVE_MAX_PIXELS (2500x2000 JPEG, 79 KB)", 413, "too_large",
             f"limit is {MAX_PIXELS}", post(content=encode(Image.new("RGB", (2500, 2000)), "JPEG"),
                                            content_type="image/jpeg")),
        Case("SVG (refused)", 422, "invalid_image", "not a recognised image",
             post(content=svg, content_type="image/svg+xml")),
        Case("PDF (refused)", 422, "invalid_image", "not a recognised image",
             post(content=pdf, content_type="application/octet-stream")),
        Case("PPM (readable by PIL, not on the allow-list)", 422, "invalid_image",
             "format PPM is not accepted", post(content=encode(rgb, "PPM"))),
        # -- awkward but valid images: classified
        Case("1x1 image", 200, "", "", post(content=image_bytes(1, 1)), classified),
        Case("CMYK JPEG", 200, "", "", post(content=encode(rgb.convert("CMYK"), "JPEG")),
             classified),
        Case("16-bit PNG", 200, "", "", post(content=encode(sixteen, "PNG")), classified),
        Case("palette PNG", 200, "", "", post(content=encode(rgb.convert("P"), "PNG")),
             classified),
        Case("palette PNG with transparency", 200, "", "",
             post(content=encode(rgb.convert("P"), "PNG", transparency=3)), classified),
        Case("RGBA PNG", 200, "", "", post(content=encode(rgba, "PNG")), classified),
        Case("grayscale PNG", 200, "", "", post(content=encode(rgb.convert("L"), "PNG")),
             classified),
        Case("animated GIF (first frame used)", 200, "", "",
             post(CLASSIFY + "?crops=5", content=gif, content_type="image/gif"),
             same_as_first_frame(gif_first)),
        Case("EXIF-rotated JPEG (orientation applied)", 200, "", "",
             post(content=exif_rotated(), content_type="image/jpeg"), portrait_boxes),
        Case("BMP", 200, "", "", post(content=encode(rgb, "BMP")), classified),
        Case("TIFF", 200, "", "", post(content=encode(rgb, "TIFF")), classified),
        # -- the request around the image
        Case("oversize body (Content-Length over the limit)", 413, "too_large", "over the limit",
             post(content=b"\xff" * (BODY_LIMIT + 100_000))),
        Case("oversize chunked body (no Content-Length)", 413, "too_large", "over the limit",
             post(content=chunks(BODY_LIMIT + 500_000))),  # type: ignore[arg-type]
        Case("wrong Content-Type (application/json)", 415, "unsupported_media_type",
             "Content-Type", post(content=good, content_type="application/json")),
        Case("an image URL instead of bytes (never fetched)", 415, "unsupported_media_type",
             "Content-Type", post(content=b'{"url": "http://169.254.169.254/latest/x.jpg"}',
                                  content_type="application/json")),
        Case("no Content-Type", 415, "unsupported_media_type", "Content-Type",
             post(content=good, content_type="")),
        Case("multipart with no file", 422, "invalid_request", "no file in the field 'images'",
             post(data={"crops": "3"}, files=[("other", ("", b"", ""))])),
        Case("multipart file in the wrong field", 422, "invalid_request", "'images'",
             post(files=upload(good, field_name="photo"))),
        Case("multipart with a broken boundary", 422, "invalid_request", "malformed multipart",
             post(content=b"--zzz\r\nContent-Disposition: form-data; name=\"images\"\r\n\r\nabc",
                  content_type="multipart/form-data; boundary=yyy")),
        Case("too many files (5 > 4)", 422, "invalid_request", "too many files",
             post(files=upload(*[good] * 5))),
        Case("GET on the classify route", 405, "method_not_allowed", "method not allowed",
             post(method="GET", content_type=None)),
        # -- parameters
        Case("crops not a number", 422, "invalid_request", "integer",
             post(q + "crops=ten", files=one)),
        Case("crops negative", 422, "invalid_request", "crops", post(q + "crops=-4", files=one)),
        Case("crops zero", 422, "invalid_request", "crops", post(q + "crops=0", files=one)),
        Case("crops huge (10^20)", 422, "invalid_request", "integer",
             post(q + "crops=99999999999999999999", files=one)),
        Case("crops over the view limit", 422, "invalid_request", "limit",
             post(q + "crops=41", files=one)),
        Case("crops given twice", 422, "invalid_request", "2 times",
             post(q + "crops=1&crops=2", files=one)),
        Case("crops and views together", 422, "invalid_request", "not both",
             post(q + "crops=3&views=center", files=one)),
        Case("unknown view kind", 422, "invalid_request", "unknown view kind",
             post(q + "views=zoom:3", files=one)),
        Case("malformed views (count not a number)", 422, "invalid_request", "positive integer",
             post(q + "views=random:two", files=one)),
        Case("malformed views (empty items)", 422, "invalid_request", "unknown view kind",
             post(q + "views=,,", files=one)),
        Case("more fixed crops than exist", 422, "invalid_request", "at most 5",
             post(q + "views=fixed:6", files=one)),
        Case("views over the limit", 422, "invalid_request", "limit",
             post(q + "views=random:41", files=one)),
        Case("view size 0", 422, "invalid_request", "between",
             post(q + "views=full@0", files=one)),
        Case("absurd view size", 422, "invalid_request", "between",
             post(q + "views=center@100000", files=one)),
        Case("whole-image views over the pixel budget", 422, "invalid_request", "pixels",
             post(q + "views=full@2000,mfull@2000", files=one)),
        Case("bad level", 422, "invalid_request", "level", post(q + "level=median", files=one)),
        Case("top_k zero", 422, "invalid_request", "top_k", post(q + "top_k=0", files=one)),
        Case("top_k above the class count", 422, "invalid_request", "top_k",
             post(q + "top_k=11", files=one)),
        Case("seed negative", 422, "invalid_request", "seed", post(q + "seed=-1", files=one)),
        Case("seed over 2^31-1", 422, "invalid_request", "seed",
             post(q + "seed=2147483648", files=one)),
        Case("label out of range", 422, "invalid_request", "label",
             post(q + "label=10", files=one)),
        Case("label unknown synset", 422, "invalid_request", "label",
             post(q + "label=n99999999", files=one)),
        Case("one label for two images", 422, "invalid_request", "one label per",
             post(q + "label=1", files=upload(good, good))),
        # -- model names and paths
        Case("unknown model", 404, "unknown_model", "known models: tiny",
             post("/v1/models/nope/classify", content=good)),
        Case("path trick ../ (sent literally)", 404, "not_found", "not found",
             raw("POST /v1/models/../../etc/passwd/classify", good)),
        Case("path trick %2e%2e%2f (URL-encoded)", 404, "not_found", "not found",
             raw("POST /v1/models/%2e%2e%2f%2e%2e%2fetc/classify", good)),
        Case("path trick ..%2Ftiny", 404, "not_found", "not found",
             post("/v1/models/..%2Ftiny/classify", content=good)),
        Case("model name ..tiny", 404, "unknown_model", "unknown model",
             post("/v1/models/..tiny/classify", content=good)),
        Case("model name with NUL (%00)", 404, "unknown_model", "unknown model",
             raw("POST /v1/models/tiny%00/classify", good)),
        # -- size of the request itself
        Case("long query string (8 KB views spec)", 422, "invalid_request", "longer than",
             post(q + "views=" + "random:1," * 900, files=one)),
        Case("request line over 100 KB", 431, "headers_too_large", "over 16384 bytes",
             raw("GET /healthz?" + "x" * 200_000)),
        Case("slow upload (1 byte / 0.4 s, read timeout 1 s)", 408, "request_timeout",
             "not received within", slow_upload),
    ]  # fmt: skip
    if features.check("webp"):
        cases.append(Case("WebP", 200, "", "", post(content=encode(rgb, "WEBP")), classified))
    return cases
