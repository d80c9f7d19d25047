"""Expert transport by expert group: each shard over the collective group when it is in the worker's expert group
(a node, supernode slice or NVLink domain of the plan), over gRPC otherwise (`HybridTransport`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch

from moemesh.proto import errors
from moemesh.proto.codec import TokenBatch
from moemesh.proto.collective import CollectiveTransport
from moemesh.proto.transport import ExpertTransport, GrpcTransport, ShardId

log = logging.getLogger(__name__)


LINK_KINDS = ("collective", "grpc")


def links_from_groups(groups: Sequence[Iterable[int]], worker_device: int,
                      shard_devices: Mapping[ShardId, int]) -> dict[ShardId, str]:
    """{shard: "collective" | "grpc"}: collective for shards whose device is in the worker's expert group.

    `groups`: devices of each expert group (`Plan.expert_groups`); `shard_devices`: {shard: device}. A worker whose
    device is in no group (attention not co-located with experts) gets gRPC everywhere: pass the full domains
    (`np.flatnonzero(plan.grouping.group == g)`) to put it in one."""
    group_of: dict[int, int] = {}
    for g, devices in enumerate(groups):
        for d in map(int, devices):
            if group_of.setdefault(d, g) != g:
                raise ValueError(f"groups: device {d} is in group {group_of[d]} and group {g}")
    mine = group_of.get(int(worker_device))
    return {shard: "collective" if mine is not None and group_of.get(int(d)) == mine else "grpc"
            for shard, d in shard_devices.items()}


class HybridTransport(ExpertTransport):
    """Each shard through the transport its link names: `links` {shard: "collective" | "grpc"} (see
    `links_from_groups`). Shards added later (replicas started by the controller) go over gRPC.

    Fallback: process groups are static, so a shard whose collective link ended (its process died, or it closed the
    link) never returns on it. When the gRPC part also knows that shard, it moves to gRPC for good at that point and
    the call is sent again there (dispatch is idempotent); the Dispatcher's Unavailable handling (reroute, wait for
    the restart) then runs on gRPC. `messages`: replies received per link kind."""

    def __init__(self, links: Mapping[ShardId, str], *, collective: CollectiveTransport | None = None,
                 grpc_transport: GrpcTransport | None = None):
        chosen = {"collective": collective, "grpc": grpc_transport}
        known = {"collective": set(collective.shard_ranks) if collective else set(),
                 "grpc": set(grpc_transport.addresses) if grpc_transport else set()}
        self.routes: dict[ShardId, ExpertTransport] = {}
        for shard, kind in links.items():
            if kind not in LINK_KINDS:
                raise ValueError(f"links[{shard!r}]: {kind!r} is not one of {list(LINK_KINDS)}")
            if shard not in known[kind]:
                raise ValueError(f"links[{shard!r}]: {kind!r}, but the {kind} transport does not know this shard")
            self.routes[shard] = chosen[kind]
        self.collective, self.grpc = collective, grpc_transport
        self.messages = dict.fromkeys(LINK_KINDS, 0)
        self.fallbacks: list[ShardId] = []  # shards moved from a broken collective link to gRPC, in order

    def _route(self, shard: ShardId) -> ExpertTransport:
        transport = self.routes.get(shard)
        if transport is None:
            raise ValueError(f"shard: unknown destination {shard!r}; known: {sorted(map(str, self.routes))}")
        if transport is self.collective and self.collective.is_down(shard) and self._fall_back(shard):
            return self.grpc
        return transport

    def _fall_back(self, shard: ShardId) -> bool:
        """Move `shard` to gRPC if its collective link ended and gRPC knows it -> whether it moved."""
        if self.grpc is None or shard not in self.grpc.addresses or not self.collective.is_down(shard):
            return False
        if self.routes.get(shard) is self.collective:
            self.routes[shard] = self.grpc
            self.fallbacks.append(shard)
            log.warning("shard %r: collective link ended; using gRPC from now on", shard)
        return True

    async def dispatch(self, shard: ShardId, batch: TokenBatch) -> torch.Tensor:
        transport = self._route(shard)
        try:
            out = await transport.dispatch(shard, batch)
        except errors.Unavailable:
            if transport is not self.collective or not self._fall_back(shard):
                raise
            transport = self.grpc
            out = await transport.dispatch(shard, batch)
        self.messages["collective" if transport is self.collective else "grpc"] += 1
        return out

    async def health(self, shard: ShardId, timeout_s: float) -> bool:
        return shard in self.routes and await self._route(shard).health(shard, timeout_s)

    async def refresh(self, shard: ShardId, timeout_s: float) -> bool:
        return shard in self.routes and await self._route(shard).refresh(shard, timeout_s)

    def add(self, shard: ShardId, address: str) -> None:
        if self.grpc is None:
            raise ValueError(f"shard: cannot add {shard!r} at {address}: this transport has no gRPC part")
        self.grpc.add(shard, address)
        self.routes[shard] = self.grpc

    async def remove(self, shard: ShardId) -> None:
        if self.routes.get(shard) is self.grpc and self.grpc is not None:
            await self.grpc.remove(shard)
            del self.routes[shard]

    async def close(self) -> None:
        for transport in (self.collective, self.grpc):
            if transport is not None:
                await transport.close()
