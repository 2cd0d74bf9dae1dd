"""HTTP/1.1 over a bare socket, for requests a client library would refuse or tidy up
(literal ``../`` in a path, a body dribbled out slower than the server's read timeout)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int  # 0: the server closed the connection without answering
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after (or instead of) answering

    def json(self) -> dict:
        return json.loads(self.body)


def _address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _parse(data: bytes, closed: bool) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        return RawResponse(0, {}, b"", closed)
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return RawResponse(status, headers, body, closed)


def _read_response(sock: socket.socket, wait_close_s: float, data: bytes = b"") -> RawResponse:
    """Read one response (``data``: what has come already); then wait up to ``wait_close_s``
    to see whether the server closes the connection."""
    closed = False
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            length = _parse(data, False).headers.get("content-length")
            if length is not None and len(data) >= head_end + 4 + int(length):
                break
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            closed = True
            break
        data += chunk
    if not closed and wait_close_s > 0:
        sock.settimeout(wait_close_s)
        try:
            closed = sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            closed = False
    return _parse(data, closed)


def send_raw(
    base: str, request: bytes, *, timeout_s: float = 30, wait_close_s: float = 0
) -> RawResponse:
    """Send ``request`` as-is and read the answer."""
    with socket.create_connection(_address(base), timeout=timeout_s) as sock:
        sock.sendall(request)
        return _read_response(sock, wait_close_s)


def dribble(
    base: str,
    path: str,
    *,
    declared: int,
    first: bytes,
    every_s: float,
    max_s: float,
    content_type: str = "image/png",
) -> tuple[RawResponse, float]:
    """Send headers and ``first`` body bytes, then one byte every ``every_s`` while the server
    keeps the connection open (at most ``max_s``). Returns the answer and when it came."""
    started = time.monotonic()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(_address(base), timeout=max_s) as sock:
        sock.sendall(head + first)
        sock.settimeout(every_s)
        data = b""
        sent = len(first)
        while time.monotonic() - started < max_s:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            if chunk == b"":  # closed by the server
                return _parse(data, True), time.monotonic() - started
            if chunk:
                data += chunk
                if b"\r\n\r\n" in data:  # answered: does the server also hang up?
                    answered = time.monotonic() - started
                    sock.settimeout(max_s)
                    return _read_response(sock, 3 * every_s, data), answered
                continue
            if sent < declared:
                try:
                    sock.sendall(b"x")
                    sent += 1
                except (BrokenPipeError, ConnectionResetError):
                    return _parse(data, True), time.monotonic() - started
        return _parse(data, False), time.monotonic() - started


def open_upload(
    base: str, path: str, *, declared: int | None, first: bytes, content_type: str = "image/png"
) -> socket.socket:
    """A POST whose headers and ``first`` body bytes are sent and whose body is left
    unfinished: the caller finishes it (``finish_upload``) or hangs up (closes the socket).
    ``declared`` None: a chunked body, ``first`` sent as its first chunk."""
    length = "Transfer-Encoding: chunked" if declared is None else f"Content-Length: {declared}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n{length}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(_address(base), timeout=60)
    sock.sendall(head + (first if declared is not None else chunk(first)))
    return sock


def chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk of a chunked body (b"": the last, empty one)."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def finish_upload(sock: socket.socket, rest: bytes, *, wait_close_s: float = 0) -> RawResponse:
    """Send ``rest`` on an upload opened with ``open_upload`` and read the answer."""
    # answered and closed before the rest was sent: read what came
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(rest)
    return _read_response(sock, wait_close_s)


def request_on(sock: socket.socket, request: bytes) -> RawResponse:
    """Send ``request`` on an open connection and read its answer (kept-alive requests)."""
    sock.sendall(request)
    return _read_response(sock, 0)


def trickle_on(
    sock: socket.socket, data: bytes, *, every_s: float, max_s: float
) -> tuple[RawResponse, float]:
    """Send ``data`` (a request's headers, say) one byte every ``every_s`` on ``sock`` while
    the server keeps the connection open, at most ``max_s``; then read whatever the server
    sends until it hangs up. Returns the answer (status 0: closed without one) and the
    seconds until the server answered or hung up."""
    started = time.monotonic()
    sent = 0
    sock.settimeout(every_s)
    while time.monotonic() - started < max_s:
        try:
            got: bytes | None = sock.recv(65536)
        except TimeoutError:
            got = None
        except ConnectionResetError:
            got = b""
        if got is not None:  # the server answered or hung up
            answered = time.monotonic() - started
            sock.settimeout(max_s)
            res = _read_response(sock, max_s, got) if got else _parse(b"", True)
            return res, answered
        if sent < len(data):
            try:
                sock.sendall(data[sent : sent + 1])
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                sock.settimeout(max_s)
                return _read_response(sock, 0), time.monotonic() - started
    return _parse(b"", False), time.monotonic() - started


def trickle(base: str, data: bytes, *, every_s: float, max_s: float) -> tuple[RawResponse, float]:
    """``trickle_on`` a new connection to ``base``."""
    with socket.create_connection(_address(base), timeout=max_s) as sock:
        return trickle_on(sock, data, every_s=every_s, max_s=max_s)
