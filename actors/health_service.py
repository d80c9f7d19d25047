"""The `moemesh.Health` gRPC service, shared by every moemesh server (expert shards, Engram shards).

A server answers SERVING while its target (the plain object it wraps) says `serving`, NOT_SERVING after it closed,
and NOT_FOUND for a service name it does not host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from moemesh import __version__
from moemesh.proto import errors, health_pb2


class Servable(Protocol):
    """What a health servicer asks about: ExpertShard and EngramShard satisfy it."""

    @property
    def serving(self) -> bool: ...

    def health(self) -> str: ...


class HealthServicer:
    """The `moemesh.Health` service over one target. `services`: the names this server hosts (the empty name, the
    server as a whole, and `moemesh.Health` are always included); `expert_map_version`: what expert shards report."""

    def __init__(self, target: Servable, services: Sequence[str],
                 expert_map_version: Callable[[], int] = lambda: 0):
        self.target = target
        self.services = tuple(dict.fromkeys(("", *services, "moemesh.Health")))
        self.expert_map_version = expert_map_version

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if request.service not in self.services:
            raise errors.NotHeld(f"service: {request.service!r} is not served here; known {list(self.services)}")
        status = health_pb2.HealthCheckResponse.SERVING if self.target.serving else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status, version=__version__, detail=self.target.health(),
                                              expert_map_version=self.expert_map_version())
