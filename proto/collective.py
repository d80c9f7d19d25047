"""Expert transport over device-native point-to-point collectives: NCCL on GPUs, HCCL on Ascend NPUs (registered by
torch_npu), gloo on CPU. It carries dispatch between the attention workers and expert shards of ONE expert group
(a node, supernode slice or NVLink domain of the plan); `HybridTransport` (proto/hybrid.py) keeps gRPC for every other
shard.

Group: one torch.distributed process group per expert group; its members are the group's expert shards and the
attention workers on its devices. Convention: shards take ranks 0..S-1, workers S..S+W-1. Every worker's
`CollectiveTransport` knows every shard of the group and every `CollectiveShardServer` serves every worker of it.
`init_group` is the rendezvous. The Ray app wires it in behind `experts.transport: collective` (cluster/serve/: one
group of the base shards and the fixed attention workers; docs/wire.md, "Collective transport").

Two directions, two process groups: requests go worker -> shard on `group.requests`, replies shard -> worker on
`group.replies`. Each side keeps a receive posted at all times; NCCL runs a pair's sends and receives on one stream,
so a posted receive would hold up sends to the same peer there: one communicator per direction keeps them apart.

Framing: a message is a header, int64[HEADER], then up to three payloads sent as raw bytes (uint8 views of the
tensors, so every wire dtype travels the same way), each described in the header by (rows, cols, dtype code,
nbytes). Between two ranks each direction is one ordered stream: torch's p2p keeps the order of messages with the
same tag between a pair (gloo matches by peer and tag, NCCL ignores tags and orders by issue); all messages use tag 0
and one sender thread per peer posts a message's parts back to back, so the reader takes the header and then exactly
the payloads it announces. Replies carry the request id and may come back in any order.

Shapes: n = tokens, k = expert slots per token, D = hidden.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Mapping, Sequence

import grpc
import torch

from moemesh.proto import errors
from moemesh.proto.codec import TokenBatch
from moemesh.proto.transport import DEFAULT_MAX_MESSAGE_BYTES, DispatchTarget, ExpertTransport, ShardId

log = logging.getLogger(__name__)
from moemesh.proto.collective_link import (
    _ID,
    _KIND,
    _LAYER,
    _STATUS,
    _STATUS_CODES,
    _STEP,
    _VERSION,
    ERROR_FIELDS,
    OK,
    PING,
    REPLY,
    REPLY_FIELDS,
    REQUEST,
    REQUEST_FIELDS,
    BrokenStream,
    CollectiveGroup,
    _check_ranks,
    _error_message,
    _Link,
    decode,
    encode,
)

log = logging.getLogger(__name__)


class CollectiveTransport(ExpertTransport):
    """Dispatch to the expert shards of this worker's expert group over `group` (see the module docstring).

    `shard_ranks`: {shard: its rank}. Calls may be in flight to any number of shards at once; each waits at most
    `timeout_s` (TimeoutError, as gRPC's DEADLINE_EXCEEDED). A shard that closed its link or whose link broke
    raises `errors.Unavailable`; shard-side errors come back as the exceptions of `proto/errors.py`. The reply is a
    tensor on the group's device. Use from one event loop."""

    def __init__(self, group: CollectiveGroup, shard_ranks: Mapping[ShardId, int], *, timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        _check_ranks(group, list(shard_ranks.values()), "shard_ranks")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self.group, self.shard_ranks, self.timeout_s = group, dict(shard_ranks), timeout_s
        self._pending: dict[int, tuple[ShardId, asyncio.Future]] = {}  # request id -> (shard, reply); loop only
        self._down: dict[ShardId, str] = {}  # shard -> why its link ended
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._links = {s: _Link(group, r, group.requests, group.replies, max_message_bytes,
                                functools.partial(self._on_message, s), functools.partial(self._on_end, s))
                       for s, r in self.shard_ranks.items()}
        for link in self._links.values():
            link.start()

    async def dispatch(self, shard: ShardId, batch: TokenBatch) -> torch.Tensor:
        header, parts = encode(REQUEST, (batch.hidden, batch.expert_ids, batch.weights), REQUEST_FIELDS,
                               layer=batch.layer, step_id=batch.step_id, version=batch.expert_map_version)
        h, raws = await self._call(shard, header, parts, self.timeout_s)
        return decode(h, raws, REPLY_FIELDS)[0]

    async def health(self, shard: ShardId, timeout_s: float) -> bool:
        try:
            await self._call(shard, encode(PING)[0], [], timeout_s)
        except Exception:  # noqa: BLE001 - any failure means "not serving"
            return False
        return True

    async def _call(self, shard: ShardId, header: torch.Tensor, parts: list,
                    timeout_s: float) -> tuple[list[int], list]:
        """Send one message and wait for its reply -> the reply's (header, payload bytes); status != OK raises."""
        link = self._links.get(shard)
        if link is None:
            raise ValueError(f"shard: unknown destination {shard!r}; known: {sorted(map(str, self._links))}")
        loop = self._loop = self._loop or asyncio.get_running_loop()
        rid = next(self._ids)
        header[_ID] = rid
        future = loop.create_future()
        self._pending[rid] = (shard, future)
        deadline = loop.time() + timeout_s
        try:
            if shard in self._down:  # checked after registering: a link ending later fails `future`
                raise self._unavailable(shard)
            try:
                sent = await asyncio.wait_for(asyncio.wrap_future(link.post(header, parts)), timeout_s)
            except RuntimeError as e:  # the sender is shut down, or the backend failed to send
                raise errors.Unavailable(f"shard {shard!r}: cannot send ({e})") from None
            if not sent:
                raise self._unavailable(shard)
            return await asyncio.wait_for(future, max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
            if loop.time() < deadline:
                raise  # the shard's own TimeoutError
            raise TimeoutError(f"shard {shard!r}: no reply within {timeout_s:g} s") from None
        finally:
            self._pending.pop(rid, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by a link's end while we waited on the send: retrieved (no warning)

    def is_down(self, shard: ShardId) -> bool:
        """True once `shard`'s link ended (closed or broke): it never comes back in this process group."""
        return shard in self._down

    def _unavailable(self, shard: ShardId) -> errors.Unavailable:
        return errors.Unavailable(f"shard {shard!r} (rank {self.shard_ranks[shard]}): {self._down.get(shard)}")

    def _on_message(self, shard: ShardId, h: list[int], raws: list) -> None:  # reader thread
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, h, raws)

    def _deliver(self, h: list[int], raws: list) -> None:
        _, future = self._pending.get(h[_ID], (None, None))
        if future is None or future.done() or h[_KIND] != REPLY:
            return  # the caller gave up (timeout) or a stray message: drop it
        try:
            if h[_STATUS] != OK:
                text = bytes(decode(h, raws, ERROR_FIELDS)[0].cpu().reshape(-1).tolist()).decode(errors="replace")
                code = _STATUS_CODES.get(h[_STATUS], grpc.StatusCode.UNKNOWN)
                raise errors.exception_for(code, text)
            future.set_result((h, raws))
        except Exception as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)

    def _on_end(self, shard: ShardId, error: BaseException | None) -> None:  # reader thread
        self._down.setdefault(shard, f"collective link broke: {error}" if error else "the shard closed its link")
        if error is None or isinstance(error, BrokenStream):  # the shard still reads: answer (no-op if ours went)
            self._links[shard].post_close()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_pending, shard)

    def _fail_pending(self, shard: ShardId) -> None:
        for s, future in list(self._pending.values()):
            if s == shard and not future.done():
                future.set_exception(self._unavailable(shard))

    async def close(self, join_timeout_s: float = 10.0) -> None:
        """Fail calls in flight (Unavailable), send CLOSE to every shard and wait for theirs."""
        for shard, link in self._links.items():
            self._down.setdefault(shard, "the transport is closed")
            self._fail_pending(shard)
            link.post_close()
        await asyncio.gather(*(asyncio.to_thread(link.reader.join, join_timeout_s) for link in self._links.values()))
        for link in self._links.values():
            link.sender.shutdown(wait=False)


# ---- expert shard side -----------------------------------------------------------------------------------------------
class CollectiveShardServer:
    """Serves `target` (an `actors.experts.shard.ExpertShard`) to the attention workers `peers` (ranks) of `group`.

    `serve()` runs in the shard's event loop (the one that owns the ExpertShard): one reader thread per peer takes
    requests, the loop dispatches them concurrently (so they batch like gRPC ones), and replies go back in completion
    order. Errors travel back as a status code and message, mapped by `proto/errors.py` as for gRPC; a request that
    fails validation never stops the server. A header that cannot be framed ends that peer's link (logged)."""

    def __init__(self, target: DispatchTarget, group: CollectiveGroup, peers: Sequence[int], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        _check_ranks(group, list(peers), "peers")
        self.target, self.group, self.peers, self.max_message_bytes = target, group, list(peers), max_message_bytes
        self._links: dict[int, _Link] = {}
        self._stopping = False
        self.requests = 0  # dispatch requests received (for stats)

    async def serve(self) -> None:
        """Serve until every peer has closed its link (or `stop`)."""
        loop, done, open_peers = asyncio.get_running_loop(), asyncio.Event(), set(self.peers)

        def ended(peer: int) -> None:
            open_peers.discard(peer)
            if not open_peers:
                done.set()

        def on_end(peer: int, error: BaseException | None) -> None:  # reader thread
            if error is not None:
                log.warning("collective link from rank %d ended: %s", peer, error)
            if error is None or isinstance(error, BrokenStream):  # the peer still reads: tell it we are done
                self._links[peer].post_close()
            loop.call_soon_threadsafe(ended, peer)

        def on_message(peer: int, h: list[int], raws: list) -> None:  # reader thread
            if not self._stopping:
                asyncio.run_coroutine_threadsafe(self._handle(self._links[peer], h, raws), loop)

        for peer in self.peers:
            self._links[peer] = _Link(self.group, peer, self.group.replies, self.group.requests,
                                      self.max_message_bytes, functools.partial(on_message, peer),
                                      functools.partial(on_end, peer))
        for link in self._links.values():
            link.start()
            if self._stopping:  # `stop` came first
                link.post_close()
        await done.wait()
        for link in self._links.values():
            await asyncio.to_thread(link.sender.shutdown, True)  # our CLOSEs are out

    async def stop(self) -> None:
        """Send CLOSE to every peer; `serve` returns once each has answered with its own."""
        self._stopping = True
        for link in self._links.values():
            link.post_close()

    async def _handle(self, link: _Link, h: list[int], raws: list) -> None:
        try:
            if h[_KIND] == PING:
                serving = getattr(self.target, "serving", True)
                status = OK if serving else grpc.StatusCode.UNAVAILABLE.value[0]
                message = encode(REPLY, request_id=h[_ID], status=status)
            elif h[_KIND] == REQUEST:
                self.requests += 1
                hidden, ids, weights = decode(h, raws, REQUEST_FIELDS)
                out = await self.target.dispatch(TokenBatch(h[_LAYER], hidden, ids, weights, step_id=h[_STEP],
                                                            expert_map_version=h[_VERSION]))
                message = encode(REPLY, [out], REPLY_FIELDS, request_id=h[_ID],
                                 version=getattr(self.target, "expert_map_version", 0))
            else:
                raise ValueError(f"kind: {h[_KIND]} is not a request")
        except Exception as exc:  # noqa: BLE001 - the one place this transport maps them, like errors.map_errors
            message = _error_message(h[_ID], exc)
        try:
            await asyncio.wrap_future(link.post(*message))
        except Exception as e:  # noqa: BLE001 - the peer is gone; its reader reports the broken link
            log.warning("collective reply to rank %d not sent: %s", link.peer, e)


# ---- routing by expert group -----------------------------------------------------------------------------------------
