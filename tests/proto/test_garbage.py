"""Garbage to every gRPC method of real, token-protected shard servers (expert Dispatch, Engram Lookup, and Health on
both), as raw bytes on a raw channel: seeded random payloads of many lengths and every few-byte truncation of a valid
request. With the token each gets a client-error status (INVALID_ARGUMENT; a truncation that still parses may be
answered, or NOT_FOUND for a cut service name), never INTERNAL or UNKNOWN; without it, UNAUTHENTICATED. Afterwards
both servers still answer valid requests. (tests/proto/test_errors.py and the shard tests check the status of single
malformed messages; this is the volume test.)"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from moemesh.actors.engram.server import serve_engram_shard
from moemesh.actors.experts.server import serve_expert_shard
from moemesh.proto import codec, health_pb2
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.codec import EngramLookup, TokenBatch

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]
SECURITY = GrpcSecurity(token="garbage-test-token-0123456789")
CLIENT_ERRORS = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}
LENGTHS = [1, 2, 3, 5, 8, 17, 64, 255, 1024, 4096, 65536]


def _valid_requests(expert_shard, engram_shard) -> dict[tuple[str, str], bytes]:
    """(server, method path) -> the bytes of a valid request."""
    g = torch.Generator().manual_seed(0)
    batch = TokenBatch(0, torch.randn(3, expert_shard.cfg.hidden_size, generator=g),
                       torch.tensor([[0, 1], [2, -1], [1, 0]]), torch.rand(3, 2, generator=g))
    layer = min(engram_shard.ranges)
    start = engram_shard.ranges[layer][0]
    lookup = EngramLookup({layer: torch.arange(start, start + 5)}, "garbage")
    return {("expert", "/moemesh.ExpertShard/Dispatch"): codec.encode_dispatch(batch).SerializeToString(),
            ("expert", "/moemesh.Health/Check"):
                health_pb2.HealthCheckRequest(service="moemesh.ExpertShard").SerializeToString(),
            ("engram", "/moemesh.Engram/Lookup"): codec.encode_lookup(lookup).SerializeToString(),
            ("engram", "/moemesh.Health/Check"):
                health_pb2.HealthCheckRequest(service="moemesh.Engram").SerializeToString()}


def _garbage(valid: bytes, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    randoms = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in LENGTHS]
    step = max(1, len(valid) // 40)
    truncations = [valid[:cut] for cut in range(0, len(valid), step)]
    flipped = bytearray(valid)
    for i in rng.choice(len(valid), size=max(1, len(valid) // 50), replace=False):
        flipped[i] ^= 0xFF
    return randoms + truncations + [bytes(flipped)]


async def _status(channel: grpc.aio.Channel, method: str, payload: bytes, metadata) -> str:
    call = channel.unary_unary(method)  # no serializers: the bytes go on the wire as they are
    try:
        await call(payload, timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return "OK"


def test_garbage_to_every_method_gets_a_client_error_and_the_servers_keep_serving(expert_shard, engram_shard):
    valid = _valid_requests(expert_shard, engram_shard)

    async def main():
        servers = {"expert": await serve_expert_shard(expert_shard, security=SECURITY),
                   "engram": await serve_engram_shard(engram_shard, security=SECURITY)}
        seen: dict[tuple[str, str, bool], list[str]] = {}
        after = {}
        try:
            for (name, method), request in valid.items():
                async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[name][1]}") as channel:
                    for authed in (True, False):
                        metadata = SECURITY.metadata if authed else None
                        seen[name, method, authed] = [await _status(channel, method, payload, metadata)
                                                      for payload in _garbage(request, seed=len(seen))]
                    after[name, method] = await _status(channel, method, request, SECURITY.metadata)
        finally:
            for server, _ in servers.values():
                await server.stop(None)
        return seen, after

    seen, after = asyncio.run(main())
    for (name, method, authed), codes in seen.items():
        allowed = CLIENT_ERRORS if authed else {"UNAUTHENTICATED"}
        assert set(codes) <= allowed, (name, method, authed, sorted(set(codes)))
        if authed:  # most garbage does not parse at all
            assert codes.count("INVALID_ARGUMENT") >= len(LENGTHS) // 2, (name, method, codes)
    assert after == dict.fromkeys(valid, "OK")
