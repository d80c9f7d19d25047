"""The expert shard behind gRPC: the `moemesh.ExpertShard` servicer over a plain `ExpertShard` (actors/experts/shard.py)
and `serve_expert_shard`, which starts a `grpc.aio` server with it and the Health service."""

from __future__ import annotations

import grpc

from moemesh.actors.experts.shard import ExpertShard
from moemesh.actors.health_service import HealthServicer
from moemesh.proto import codec, errors, expert_pb2, health_pb2
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.transport import DEFAULT_MAX_MESSAGE_BYTES, message_options


class ExpertShardServicer:
    """The `moemesh.ExpertShard` gRPC service over an ExpertShard: decode, dispatch, encode. Errors become status
    codes in `proto.errors` (registered with `errors.add_service`)."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard

    async def Dispatch(self, request: expert_pb2.DispatchRequest, context) -> expert_pb2.DispatchReply:
        batch = codec.decode_dispatch(request)
        output = await self.shard.dispatch(batch)
        return codec.encode_dispatch_reply(output, batch.request_id, self.shard.expert_map_version)


async def serve_expert_shard(shard: ExpertShard, host: str = "127.0.0.1", port: int = 0, *,
                             max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                             security: GrpcSecurity | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a `grpc.aio` server with the ExpertShard and Health services; port 0 picks a free port. `security`:
    the cluster token every call must carry and TLS (default: neither). Returns (server, bound port); stop it with
    `await server.stop(grace)`."""
    security = security or GrpcSecurity()
    server = security.server(message_options(max_message_bytes))
    errors.add_service(server, ExpertShardServicer(shard), expert_pb2.DESCRIPTOR.services_by_name["ExpertShard"])
    health = HealthServicer(shard, ("moemesh.ExpertShard",), lambda: shard.expert_map_version)
    errors.add_service(server, health, health_pb2.DESCRIPTOR.services_by_name["Health"])
    bound = security.add_port(server, f"{host}:{port}")
    await server.start()
    return server, bound
