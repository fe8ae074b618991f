"""Registering servicers so that request bytes which do not parse get INVALID_ARGUMENT, not UNKNOWN.

grpc's generated ``add_*Servicer_to_server`` deserializes with ``FromString``; bytes that are no
valid message (e.g. a string field holding invalid UTF-8) then fail inside grpc, which answers
``UNKNOWN: Unexpected DecodeError``. :func:`lenient_parser` returns a :class:`MalformedRequest`
instead, and :func:`add_servicer` answers it ``INVALID_ARGUMENT`` with the parser's message
before the servicer's method runs.

    add_servicer("Inference", RouterServicer(core), server)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from . import matmamba_pb2 as pb


@dataclass(frozen=True)
class MalformedRequest:
    """Bytes that did not parse as the method's request message (e.g. a string field with bad UTF-8)."""

    type_name: str
    error: str
    request_id: str = ""

    @property
    def message(self) -> str:
        return f"the request bytes are not a valid {self.type_name}: {self.error}"


def lenient_parser(message_class: type) -> Callable[[bytes], object]:
    """A request deserializer that returns MalformedRequest instead of raising (grpc would answer UNKNOWN)."""

    def parse(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except DecodeError as err:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(err))

    return parse


def _refusing(behaviour: Callable, streaming: bool) -> Callable:
    """``behaviour`` behind a check that answers a MalformedRequest INVALID_ARGUMENT."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in behaviour(request, context):
            yield item

    return stream if streaming else unary


def add_servicer(service_name: str, servicer: object, server: grpc.aio.Server, *,
                 refuse_malformed: bool = True) -> None:
    """Register ``servicer`` for ``service_name`` (e.g. "Inference") like the generated helper, with lenient parsing.

    ``refuse_malformed=False`` hands a MalformedRequest to the servicer's method, which answers it itself.
    """
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class, reply_class = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        behaviour = getattr(servicer, method.name)
        if refuse_malformed:
            behaviour = _refusing(behaviour, method.server_streaming)
        handlers[method.name] = make(behaviour,
                                     request_deserializer=lenient_parser(request_class),
                                     response_serializer=reply_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
