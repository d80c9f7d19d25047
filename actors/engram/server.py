"""The Engram shard behind gRPC: the `moemesh.Engram` servicer over a plain `EngramShard` (actors/engram/service.py) and
`serve_engram_shard`, which starts a `grpc.aio` server with it and the Health service."""

from __future__ import annotations

import asyncio

import grpc

from moemesh.actors.engram.service import EngramShard
from moemesh.actors.health_service import HealthServicer
from moemesh.proto import codec, engram_pb2, errors, health_pb2
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.transport import DEFAULT_MAX_MESSAGE_BYTES, message_options


# ---- gRPC ------------------------------------------------------------------------------------------------------------
class EngramServicer:
    """The `moemesh.Engram` gRPC service over an EngramShard: decode, look up and encode in a worker thread (so a
    page fault on a cold memory map never stalls the event loop). Errors become status codes in `proto.errors`."""

    def __init__(self, shard: EngramShard):
        self.shard = shard

    async def Lookup(self, request: engram_pb2.LookupRequest, context) -> engram_pb2.LookupReply:
        lookup = codec.decode_lookup(request)
        return await asyncio.get_running_loop().run_in_executor(None, self._answer, lookup)

    def _answer(self, lookup: codec.EngramLookup) -> engram_pb2.LookupReply:
        return codec.encode_lookup_reply(self.shard.lookup_many(lookup.row_ids), lookup.request_id)


async def serve_engram_shard(shard: EngramShard, host: str = "127.0.0.1", port: int = 0, *,
                             max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                             security: GrpcSecurity | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a `grpc.aio` server with the Engram and Health services; port 0 picks a free port. Lookups run on
    the event loop's default executor. `security`: the cluster token every call must carry and TLS (default:
    neither). Returns (server, bound port); stop it with `await server.stop(grace)`."""
    security = security or GrpcSecurity()
    server = security.server(message_options(max_message_bytes))
    errors.add_service(server, EngramServicer(shard), engram_pb2.DESCRIPTOR.services_by_name["Engram"])
    health = HealthServicer(shard, ("moemesh.Engram",))
    errors.add_service(server, health, health_pb2.DESCRIPTOR.services_by_name["Health"])
    bound = security.add_port(server, f"{host}:{port}")
    await server.start()
    return server, bound
