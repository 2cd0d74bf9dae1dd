"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on its own
port beside the HTTP server: a codec around the same edge contract as REST (api/edge.py).
The generated stubs are the ones ``tritonclient[grpc]`` ships; without that package the
gRPC port cannot be enabled.

BYTES inputs come in ``raw_input_contents`` (length-prefixed elements, as the clients send
them) or in ``contents.bytes_contents``; outputs go back in ``raw_output_contents``.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from app.api.edge import MODEL_VERSION, Edge
from app.api.errors import error_status
from app.api.v2.infer import infer, model_metadata, server_metadata
from app.api.v2.tensors import (
    InferRequestBody,
    InputTensor,
    raw_bytes,
    split_bytes_elements,
)
from app.errors import InvalidRequestError, MidserveError

log = logging.getLogger(__name__)


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
    """Health, metadata and infer through the edge contract, as REST answers them; other
    methods answer UNIMPLEMENTED (the base class)."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @staticmethod
    def _authorization(context: Any) -> str:
        return str(dict(context.invocation_metadata() or ()).get("authorization", ""))

    async def _abort(self, context: Any, exc: MidserveError) -> None:
        await context.abort(getattr(grpc.StatusCode, error_status(exc).grpc), str(exc))

    async def _authorized(self, context: Any, probe: bool = False) -> None:
        """The token rules of REST: probes open unless ``open_probes`` is false."""
        given = self._authorization(context)
        try:
            self.edge.authorize_probe(given) if probe else self.edge.authorize(given)
        except MidserveError as exc:
            await self._abort(context, exc)

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context, probe=True)
        return pb.ServerLiveResponse(live=self.edge.health().live)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context, probe=True)
        return pb.ServerReadyResponse(ready=self.edge.health().ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context, probe=True)
        try:
            ready, _ = self.edge.model_health(request.name, request.version)
        except MidserveError as exc:
            await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context)
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorized(context)
        try:
            meta = model_metadata(self.edge, request.name, request.version)
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

        async def parse() -> InferRequestBody:
            return request_body(request)

        try:
            body, outputs = await infer(
                self.edge, request.model_name, request.model_version, "grpc", parse
            )
        except MidserveError as exc:
            await self._abort(context, exc)
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=MODEL_VERSION,
            id=body.id or "",
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=o.name, datatype=o.datatype, shape=o.shape
                )
                for o in outputs
            ],
            raw_output_contents=[raw_bytes(o) for o in outputs],
        )


async def start_grpc(edge: Edge, host: str, port: int) -> Any:
    """A started grpc.aio server on ``host:port`` (the caller stops it)."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(edge), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("Open Inference Protocol gRPC on %s:%d", host, port)
    return server
