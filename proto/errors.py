"""The one place where exceptions meet gRPC status codes, in both directions.

Servers: `add_service` registers an aio servicer so that every method's exceptions become status codes
(`status_for`), and a request whose bytes do not parse gets INVALID_ARGUMENT instead of gRPC's generic error;
servicer methods hold no try/except. Clients: `exception_for` turns a failed call back into the exception the
in-process path would have raised, so callers cannot tell the transports apart.

| exception                          | status code          |
|------------------------------------|----------------------|
| NotHeld (a ValueError)             | NOT_FOUND            |
| StaleExpertMap (a ValueError)      | FAILED_PRECONDITION  |
| Overloaded                         | RESOURCE_EXHAUSTED   |
| ValueError, KeyError               | INVALID_ARGUMENT     |
| Unavailable (a ConnectionError)    | UNAVAILABLE          |
| Unauthenticated (a PermissionError)| UNAUTHENTICATED      |
| TimeoutError                       | DEADLINE_EXCEEDED    |
| NotImplementedError                | UNIMPLEMENTED        |
| anything else                      | INTERNAL (logged)    |
"""

from __future__ import annotations

import functools
import logging

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)


class NotHeld(ValueError):
    """The request names a layer, expert or table that this server does not hold."""


class StaleExpertMap(ValueError):
    """The request was routed with another expert-map version than the one this shard serves."""


class Overloaded(RuntimeError):
    """The server has more queued work than it accepts; retry later or elsewhere."""


class Unavailable(ConnectionError):
    """The destination cannot serve: unreachable after the transport's retries, or shutting down."""


class Unauthenticated(PermissionError):
    """The call lacked the cluster token or carried a wrong one (see proto/auth.py)."""


class RemoteError(RuntimeError):
    """A remote failure with no closer Python equivalent; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code


# Most specific first: NotHeld and StaleExpertMap are ValueErrors.
_TO_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotHeld, grpc.StatusCode.NOT_FOUND),
    (StaleExpertMap, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (KeyError, grpc.StatusCode.INVALID_ARGUMENT),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)
_FROM_STATUS = {
    grpc.StatusCode.NOT_FOUND: NotHeld,
    grpc.StatusCode.FAILED_PRECONDITION: StaleExpertMap,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.INVALID_ARGUMENT: ValueError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code a server answers for `exc`."""
    for kind, code in _TO_STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def exception_for(code: grpc.StatusCode, details: str) -> Exception:
    """The exception a client raises for a failed call (the inverse of `status_for`)."""
    kind = _FROM_STATUS.get(code)
    return kind(details) if kind is not None else RemoteError(code, details)


def _details(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument; use the argument itself.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc) or type(exc).__name__


def map_errors(method):
    """Decorator for an async servicer method (`(self, request, context)` or bound `(request, context)`): an
    exception aborts the call with `status_for(exc)` and the exception's message as details; INTERNAL ones are logged
    with their traceback."""

    @functools.wraps(method)
    async def wrapper(*args):
        request, context = args[-2:]
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        try:
            return await method(*args)
        except grpc.aio.AbortError:
            raise  # the method aborted on purpose
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps them all
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__qualname__)
            await context.abort(code, _details(exc))

    return wrapper


class MalformedRequest:
    """What the tolerant deserializer hands the servicer when the request bytes do not parse."""

    def __init__(self, message_type: str, error: Exception):
        self.text = f"request: not a valid {message_type} message ({error or 'cannot parse'})"

    def __str__(self) -> str:
        return self.text


def _tolerant(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, e)

    return parse


def add_service(server: grpc.aio.Server, servicer: object, service) -> None:
    """Register `servicer` for the unary-unary methods of `service` (a ServiceDescriptor, e.g.
    `expert_pb2.DESCRIPTOR.services_by_name["ExpertShard"]`): each method `servicer.<Name>` is wrapped by
    `map_errors` and fed by a deserializer that turns unparsable bytes into INVALID_ARGUMENT."""
    handlers = {}
    for m in service.methods:
        if m.client_streaming or m.server_streaming:
            raise NotImplementedError(f"{service.full_name}.{m.name}: only unary-unary methods are supported")
        request_class = message_factory.GetMessageClass(m.input_type)
        reply_class = message_factory.GetMessageClass(m.output_type)
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            map_errors(getattr(servicer, m.name)), request_deserializer=_tolerant(request_class),
            response_serializer=reply_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
