"""The exception <-> status-code map, on a real grpc.aio server: every mapped exception arrives as its code, unparsable
bytes get INVALID_ARGUMENT (gRPC alone says UNKNOWN), and the server keeps answering afterwards."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moemesh.proto import errors, health_pb2, health_pb2_grpc

RAISES = {
    "value": ValueError("hidden: bad"),
    "key": KeyError("layers.1.ffn.experts.3.w1.weight"),
    "not_held": errors.NotHeld("layer: 9 is not held"),
    "stale": errors.StaleExpertMap("expert_map_version: 1 vs 2"),
    "overloaded": errors.Overloaded("too many tokens"),
    "unavailable": errors.Unavailable("closing"),
    "timeout": TimeoutError("slow"),
    "unimplemented": NotImplementedError("later"),
    "bug": RuntimeError("boom"),
    "zero": ZeroDivisionError("division by zero"),
}
EXPECTED = {
    "value": grpc.StatusCode.INVALID_ARGUMENT, "key": grpc.StatusCode.INVALID_ARGUMENT,
    "not_held": grpc.StatusCode.NOT_FOUND, "stale": grpc.StatusCode.FAILED_PRECONDITION,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED, "unavailable": grpc.StatusCode.UNAVAILABLE,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED, "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "bug": grpc.StatusCode.INTERNAL, "zero": grpc.StatusCode.INTERNAL,
}


class _Raising:
    """Health servicer whose Check raises the exception named by `request.service`; no try/except in sight."""

    async def Check(self, request, context):
        if request.service in RAISES:
            raise RAISES[request.service]
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING, detail="ok")


async def _with_server(body):
    server = grpc.aio.server()
    errors.add_service(server, _Raising(), health_pb2.DESCRIPTOR.services_by_name["Health"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await body(channel)
    finally:
        await server.stop(None)


def test_every_exception_arrives_as_its_status_code():
    async def body(channel):
        stub, seen = health_pb2_grpc.HealthStub(channel), {}
        for name in RAISES:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            seen[name] = (info.value.code(), info.value.details())
        ok = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # still serving after all of them
        return seen, ok

    seen, ok = asyncio.run(_with_server(body))
    assert {name: code for name, (code, _) in seen.items()} == EXPECTED
    assert seen["value"][1] == "hidden: bad"
    assert seen["key"][1] == "layers.1.ffn.experts.3.w1.weight"  # KeyError's message without repr quotes
    assert ok.detail == "ok"


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff\x0f", b"\x0a\x10short", bytes(range(256)) * 4])
def test_unparsable_request_gets_invalid_argument(garbage):
    async def body(channel):
        raw = channel.unary_unary("/moemesh.Health/Check")  # no serializer: raw bytes on the wire
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(garbage, timeout=5)
        ok = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return info.value, ok

    err, ok = asyncio.run(_with_server(body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid moemesh.HealthCheckRequest" in err.details()
    assert ok.detail == "ok"


@pytest.mark.parametrize("name", list(RAISES))
def test_exception_for_inverts_status_for(name):
    exc = RAISES[name]
    back = errors.exception_for(errors.status_for(exc), "details")
    if EXPECTED[name] == grpc.StatusCode.INTERNAL or name == "unimplemented":
        assert isinstance(back, errors.RemoteError) and back.code == EXPECTED[name]
    elif name == "key":
        assert type(back) is ValueError  # KeyError and ValueError share INVALID_ARGUMENT; both come back ValueError
    else:
        assert type(back) is type(exc)
