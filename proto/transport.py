"""Expert transport: "send this layer's tokens to expert shard X and get the combined result back".

One interface (`ExpertTransport`), two implementations: `InProcessTransport` calls shard objects directly (tests,
single node) and `GrpcTransport` talks to shard servers over `grpc.aio`. Both raise the same exceptions (ValueError,
`errors.NotHeld`, `errors.StaleExpertMap`, `errors.Overloaded`, `errors.Unavailable`, ...), so the attention worker
never knows which one it has. Device-native collectives (NCCL/HCCL) can be a third implementation later.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Protocol

import grpc
import torch

from moemesh.proto import codec, errors, expert_pb2, expert_pb2_grpc, health_pb2, health_pb2_grpc
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.codec import TokenBatch

ShardId = Hashable  # a destination as the plan names it (an int index or a name)
# Where a destination listens now (`host:port`): a shard restarted by Serve may come back on another port.
Resolver = Callable[[Hashable], Awaitable[str]]

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # 4096 tokens x 7168 x fp32 is 117 MB; gRPC's default is 4 MiB


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the message size limits (both directions) to `max_message_bytes`."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class ExpertTransport(ABC):
    """Sends one MoE layer's tokens to one expert shard and returns the shard's combined result."""

    @abstractmethod
    async def dispatch(self, shard: ShardId, batch: TokenBatch) -> torch.Tensor:
        """-> [n, D] in `batch.hidden`'s dtype: per token, the weighted sum over the token's experts held by `shard`
        (zeros for tokens with none there). Read-only: add it to something, do not write into it."""

    async def health(self, shard: ShardId, timeout_s: float) -> bool:
        """True when `shard` answers that it serves (a health check), False otherwise; never raises for a dead
        shard."""
        return True

    async def refresh(self, shard: ShardId, timeout_s: float) -> bool:
        """Ask where `shard` listens now and reconnect there if it moved -> True if the address changed. A transport
        without a resolver keeps its addresses (False)."""
        return False

    async def close(self) -> None:
        """Release connections. The transport is unusable afterwards."""


class DispatchTarget(Protocol):
    """What the in-process transport calls: `actors.experts.shard.ExpertShard` satisfies it."""

    async def dispatch(self, batch: TokenBatch) -> torch.Tensor: ...


class InProcessTransport(ExpertTransport):
    """Calls shard objects living in this process: no copies, no serialization."""

    def __init__(self, shards: Mapping[ShardId, DispatchTarget]):
        self.shards = dict(shards)

    async def dispatch(self, shard: ShardId, batch: TokenBatch) -> torch.Tensor:
        target = self.shards.get(shard)
        if target is None:
            raise ValueError(f"shard: unknown destination {shard!r}; known: {sorted(map(str, self.shards))}")
        return await target.dispatch(batch)

    async def health(self, shard: ShardId, timeout_s: float) -> bool:
        return bool(getattr(self.shards.get(shard), "serving", False))


class ChannelPool:
    """One `grpc.aio` channel per destination (opened on first use, in the running event loop) and the stubs made
    on it; `refresh` re-points a destination that moved (a restarted process on a new port)."""

    def __init__(self, addresses: Mapping[Hashable, str], security: GrpcSecurity, options: list[tuple[str, int]],
                 resolver: Resolver | None = None, what: str = "destination"):
        self.addresses, self.security, self.options = dict(addresses), security, options
        self.resolver, self.what = resolver, what
        self._channels: dict[Hashable, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[Hashable, type], object] = {}

    def stub(self, dest: Hashable, stub_cls: type):
        stub = self._stubs.get((dest, stub_cls))
        if stub is None:
            channel = self._channels.get(dest)
            if channel is None:
                address = self.addresses.get(dest)
                if address is None:
                    raise ValueError(f"{self.what}: unknown destination {dest!r}; "
                                     f"known: {sorted(map(str, self.addresses))}")
                channel = self._channels[dest] = self.security.channel(address, self.options)
            stub = self._stubs[(dest, stub_cls)] = stub_cls(channel)
        return stub

    async def refresh(self, dest: Hashable, timeout_s: float) -> bool:
        """Ask the resolver where `dest` listens now; reconnect there if it moved -> True if it moved."""
        if self.resolver is None:
            return False
        address = await resolve_address(self.resolver, dest, timeout_s)
        if address is None or address == self.addresses.get(dest):
            return False
        self.addresses[dest] = address
        await self._close_channel(dest)
        return True

    def add(self, dest: Hashable, address: str) -> None:
        """A new destination (e.g. an expert replica started by the controller); its channel opens on first use."""
        if self.addresses.get(dest, address) != address:
            raise ValueError(f"{self.what}: {dest!r} is already known at {self.addresses[dest]}, not {address}")
        self.addresses[dest] = address

    async def remove(self, dest: Hashable) -> None:
        """Forget a destination and close its channel (calls still in flight on it fail as cancelled)."""
        self.addresses.pop(dest, None)
        await self._close_channel(dest)

    async def _close_channel(self, dest: Hashable) -> None:
        """Drop `dest`'s channel and stubs (the next `stub` call opens a new one at its current address)."""
        self._stubs = {key: stub for key, stub in self._stubs.items() if key[0] != dest}
        channel = self._channels.pop(dest, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        for channel in channels:
            await channel.close()


def reconnect_options(max_message_bytes: int, backoff_s: float, max_backoff_ms: int) -> list[tuple[str, int]]:
    """Message size limits, and reconnection on our own schedule: gRPC's default waits 1 s (growing to 120 s) before
    reconnecting to a lost peer and fails calls fast meanwhile, which would make retries and failback no-ops."""
    backoff_ms = max(int(backoff_s * 1000), 10)
    return message_options(max_message_bytes) + [
        ("grpc.initial_reconnect_backoff_ms", backoff_ms), ("grpc.min_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", max(max_backoff_ms, backoff_ms, 1000))]


class GrpcTransport(ExpertTransport):
    """Calls expert shard servers: one `grpc.aio` channel per destination (opened on first use, in the running event
    loop), a deadline per call, bounded retries with exponential backoff on UNAVAILABLE (dispatch is idempotent).
    `security`: the cluster token sent on every call and TLS (default: neither), as the shards' servers expect.
    `resolver`: where a shard listens now (e.g. asked through its Serve handle), for `refresh` after a restart."""

    def __init__(self, addresses: Mapping[ShardId, str], *, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.05, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 security: GrpcSecurity | None = None, resolver: Resolver | None = None):
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_message_bytes <= 0:
            raise ValueError(f"GrpcTransport: bad settings timeout_s={timeout_s} retries={retries} "
                             f"backoff_s={backoff_s} max_message_bytes={max_message_bytes}")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.security = security or GrpcSecurity()
        options = reconnect_options(max_message_bytes, backoff_s, int(backoff_s * 1000) * 2 ** retries)
        self.pool = ChannelPool(addresses, self.security, options, resolver, what="shard")
        self._released: set[ShardId] = set()

    @property
    def addresses(self) -> dict[ShardId, str]:
        return self.pool.addresses

    async def dispatch(self, shard: ShardId, batch: TokenBatch) -> torch.Tensor:
        if shard in self._released:  # a replica the controller stopped: its holders' other copies take the tokens
            raise errors.Unavailable(f"shard {shard!r} was released (dropped from the expert map)")
        stub = self.pool.stub(shard, expert_pb2_grpc.ExpertShardStub)
        try:
            reply = await self._call(stub.Dispatch, codec.encode_dispatch(batch))  # encoded once, reused by retries
        except errors.RemoteError as e:
            if shard in self._released and e.code == grpc.StatusCode.CANCELLED:  # its channel closed under the call
                raise errors.Unavailable(f"shard {shard!r} was released during the call") from None
            raise
        return codec.decode_dispatch_reply(reply)

    async def _call(self, method, request: expert_pb2.DispatchRequest) -> expert_pb2.DispatchReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        attempt = 0
        while True:
            try:
                return await method(request, timeout=max(deadline - loop.time(), 0.001),
                                    metadata=self.security.metadata)
            except grpc.aio.UsageError:  # `refresh` closed this channel (the shard moved): the caller re-sends
                raise errors.Unavailable("the shard's channel was replaced (it moved to a new address)") from None
            except grpc.aio.AioRpcError as e:
                pause = self.backoff_s * 2 ** attempt
                retry = e.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries
                if not retry or loop.time() + pause >= deadline:
                    raise errors.exception_for(e.code(), e.details() or "") from None
            await asyncio.sleep(pause)
            attempt += 1

    async def health(self, shard: ShardId, timeout_s: float) -> bool:
        if shard in self._released or shard not in self.pool.addresses:
            return False
        try:
            reply = await self.pool.stub(shard, health_pb2_grpc.HealthStub).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s, metadata=self.security.metadata)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError):
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def refresh(self, shard: ShardId, timeout_s: float) -> bool:
        return await self.pool.refresh(shard, timeout_s)

    def add(self, shard: ShardId, address: str) -> None:
        self.pool.add(shard, address)
        self._released.discard(shard)

    async def remove(self, shard: ShardId) -> None:
        """Forget `shard`: calls still under way on it, and any later ones, fail as Unavailable (so the Dispatcher
        sends their tokens to the experts' other holders)."""
        self._released.add(shard)
        await self.pool.remove(shard)

    async def close(self) -> None:
        await self.pool.close()


async def resolve_address(resolver: Resolver, target: Hashable, timeout_s: float) -> str | None:
    """`resolver(target)` within `timeout_s` -> `host:port`, or None when it failed or took too long (a restarting
    target has no address yet; the caller tries again later)."""
    try:
        address = await asyncio.wait_for(resolver(target), timeout_s)
    except Exception:  # noqa: BLE001 - any failure means "not known yet"; the caller's loop is bounded
        return None
    return address if isinstance(address, str) and address else None
