"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on its own
port beside the HTTP server, with the same handlers as REST. The generated stubs are the
ones ``tritonclient[grpc]`` ships; without that package the gRPC port cannot be enabled.

BYTES inputs come in ``raw_input_contents`` (length-prefixed elements, as the clients send
them) or in ``contents.bytes_contents``; outputs go back in ``raw_output_contents``.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from app.api.routes import check_bearer
from app.api.v2 import handlers
from app.api.v2.tensors import (
    InferRequestBody,
    InputTensor,
    raw_bytes,
    split_bytes_elements,
)
from app.errors import InvalidRequestError, MidserveError
from app.service import ClassifyService

log = logging.getLogger(__name__)

# HTTP status of a domain error (handlers.v2_status) -> gRPC status
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _param(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def request_body(req: Any) -> InferRequestBody:
    """A ModelInferRequest as the protocol's request body."""
    inputs = []
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise InvalidRequestError(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    for i, tensor in enumerate(req.inputs):
        parsed = InputTensor(tensor.name, tensor.datatype, list(tensor.shape))
        if tensor.datatype == "BYTES":
            elements = split_bytes_elements(raw[i]) if raw else list(tensor.contents.bytes_contents)
            parsed.elements = elements
            expected = 1
            for dim in parsed.shape:
                expected *= dim
            if len(elements) != expected:
                raise InvalidRequestError(
                    f"input {tensor.name!r}: shape {parsed.shape} holds {expected} element(s), "
                    f"the data {len(elements)}"
                )
        inputs.append(parsed)
    outputs = [
        {"name": o.name, "parameters": {k: _param(v) for k, v in o.parameters.items()}}
        for o in req.outputs
    ]
    params = {k: _param(v) for k, v in req.parameters.items()}
    return InferRequestBody(req.id or None, params, inputs, outputs)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Health, metadata and infer; other methods answer UNIMPLEMENTED (the base class)."""

    def __init__(self, service: ClassifyService, tokens: list[str]) -> None:
        self.service = service
        self.tokens = tokens

    async def _authorized(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        try:
            check_bearer(self.tokens, metadata.get("authorization", ""))
        except MidserveError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    async def _abort(self, context: Any, exc: MidserveError) -> None:
        code = GRPC_CODES.get(handlers.v2_status(exc), grpc.StatusCode.INTERNAL)
        await context.abort(code, str(exc))

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            slot = handlers.model_slot(self.service, request.name, request.version)
        except MidserveError as exc:
            await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=slot.state == "ready")

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context)
        return pb.ServerMetadataResponse(
            name=handlers.SERVER_NAME,
            version=handlers.SERVER_VERSION,
            extensions=handlers.EXTENSIONS,
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context)
        try:
            meta = handlers.model_metadata(self.service, request.name, request.version)
        except MidserveError as exc:
            await self._abort(context, exc)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]],
            outputs=[tensors(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context)
        try:
            body, outputs = await handlers.infer(
                self.service,
                request.model_name,
                request.model_version,
                lambda: request_body(request),
                handlers.v2_status,
            )
        except MidserveError as exc:
            await self._abort(context, exc)
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=handlers.MODEL_VERSION,
            id=body.id or "",
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=o.name, datatype=o.datatype, shape=o.shape
                )
                for o in outputs
            ],
            raw_output_contents=[raw_bytes(o) for o in outputs],
        )


async def start_grpc(service: ClassifyService, tokens: list[str], host: str, port: int) -> Any:
    """A started grpc.aio server on ``host:port`` (the caller stops it)."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service, tokens), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("Open Inference Protocol gRPC on %s:%d", host, port)
    return server
