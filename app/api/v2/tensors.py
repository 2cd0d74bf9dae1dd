"""Tensors on the wire: the JSON body and the binary tensor data extension.

An inference request is a JSON header, optionally followed by raw tensor bytes whose
header length is given by ``Inference-Header-Content-Length``; each input with a
``binary_data_size`` parameter takes its bytes from there, in input order. BYTES elements
are 4-byte little-endian lengths followed by the bytes, as every official client sends
them. No torch and no HTTP in here: bad bodies raise ``InvalidRequestError``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from app.errors import InvalidRequestError

HEADER_LENGTH = "inference-header-content-length"
NUMPY_TYPES = {"FP32": "<f4", "INT32": "<i4", "INT64": "<i8", "UINT8": "u1"}


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    elements: list[bytes] = field(default_factory=list)  # BYTES elements, in order


@dataclass
class InferRequestBody:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[InputTensor]
    outputs: list[dict[str, Any]]  # the requested outputs, as sent


def _json_header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, rest = body, b""
    else:
        if not header_length.strip().isdigit():
            raise InvalidRequestError(f"Inference-Header-Content-Length {header_length!r}")
        size = int(header_length)
        if size > len(body):
            raise InvalidRequestError(
                f"Inference-Header-Content-Length {size} is past the body's {len(body)} bytes"
            )
        head, rest = body[:size], body[size:]
    try:
        parsed = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"the inference header is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("the inference header must be a JSON object")
    return parsed, rest


def split_bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor data: each element a 4-byte little-endian length, then its bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidRequestError("truncated BYTES tensor: a length prefix is cut short")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidRequestError(
                f"truncated BYTES tensor: an element of {size} bytes has {len(raw) - at} left"
            )
        elements.append(raw[at : at + size])
        at += size
    return elements


def join_bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _flat(data: Any) -> list[Any]:
    """JSON tensor data, nested (row-major) or flat, as one flat list."""
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flat(item)]


def _json_elements(name: str, data: Any, content_type: str | None) -> list[bytes]:
    elements = []
    for value in _flat(data):
        if not isinstance(value, str):
            raise InvalidRequestError(f"input {name!r}: BYTES data must be strings")
        if content_type == "base64":
            try:
                elements.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidRequestError(f"input {name!r}: data is not base64") from None
        else:
            elements.append(value.encode("utf-8", "surrogateescape"))
    return elements


def _shape(name: str, shape: Any) -> list[int]:
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidRequestError(f"input {name!r}: shape must be a list of sizes, got {shape!r}")
    return shape


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequestBody:
    """The request's JSON header and its inputs' BYTES elements, checked against shapes."""
    header, binary = _json_header(body, header_length)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequestError("the request has no 'inputs'")
    inputs, at = [], 0
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidRequestError("every input needs a 'name'")
        name = raw["name"]
        tensor = InputTensor(name, str(raw.get("datatype")), _shape(name, raw.get("shape")))
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(binary):
                raise InvalidRequestError(
                    f"input {name!r}: binary_data_size {size!r} is past the body's binary part"
                )
            chunk, at = binary[at : at + size], at + size
            if tensor.datatype == "BYTES":
                tensor.elements = split_bytes_elements(chunk)
        elif "data" in raw:
            if tensor.datatype == "BYTES":
                tensor.elements = _json_elements(name, raw["data"], params.get("content_type"))
        else:
            raise InvalidRequestError(f"input {name!r} has neither 'data' nor binary data")
        if tensor.datatype == "BYTES" and len(tensor.elements) != math.prod(tensor.shape):
            raise InvalidRequestError(
                f"input {name!r}: shape {tensor.shape} holds {math.prod(tensor.shape)} "
                f"element(s), the data {len(tensor.elements)}"
            )
        inputs.append(tensor)
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise InvalidRequestError("'outputs' must be a list of objects with a 'name'")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("request 'parameters' must be an object")
    request_id = header.get("id")
    return InferRequestBody(
        str(request_id) if request_id is not None else None, parameters, inputs, outputs
    )


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]  # numbers, or BYTES elements


def raw_bytes(out: OutputTensor) -> bytes:
    """An output's binary form: little-endian numbers, or length-prefixed BYTES elements."""
    if isinstance(out.values, np.ndarray):
        return out.values.astype(NUMPY_TYPES[out.datatype]).tobytes()
    return join_bytes_elements(out.values)


def encode_infer_response(
    head: dict[str, Any], outputs: list[OutputTensor], binary: set[str]
) -> tuple[bytes, int | None]:
    """The response body and, when any output goes binary, its JSON header's length."""
    tensors, chunks = [], []
    for out in outputs:
        tensor: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.name in binary:
            raw = raw_bytes(out)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(out.values, np.ndarray):
            tensor["data"] = out.values.reshape(-1).tolist()
        else:
            tensor["data"] = [v.decode("utf-8", "replace") for v in out.values]
        tensors.append(tensor)
    header = orjson.dumps({**head, "outputs": tensors})  # C, compact: serialised once
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
