"""Expert transport over device-native point-to-point collectives: NCCL on GPUs, HCCL on Ascend NPUs (registered by
torch_npu), gloo on CPU. It carries dispatch between the attention workers and expert shards of ONE expert group
(a node, supernode slice or NVLink domain of the plan); `HybridTransport` keeps gRPC for every other shard.

Group: one torch.distributed process group per expert group; its members are the group's expert shards and the
attention workers on its devices. Convention: shards take ranks 0..S-1, workers S..S+W-1. Every worker's
`CollectiveTransport` knows every shard of the group and every `CollectiveShardServer` serves every worker of it.
`init_group` is the rendezvous. The Ray app wires it in behind `experts.transport: collective` (cluster/app.py: one
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
import concurrent.futures
import functools
import importlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
import torch
import torch.distributed as dist

from moemesh.proto import errors
from moemesh.proto.codec import TokenBatch
from moemesh.proto.transport import (DEFAULT_MAX_MESSAGE_BYTES, DispatchTarget, ExpertTransport, GrpcTransport,
                                     ShardId)

log = logging.getLogger(__name__)

# ---- framing ---------------------------------------------------------------------------------------------------------
HEADER = 20
MAGIC = 0x4D4F454D45534801  # "MOEMESH" + protocol version 1
REQUEST, REPLY, PING, CLOSE = 1, 2, 3, 4
OK = 0  # status; anything else is a grpc.StatusCode value, mapped by proto/errors.py
# header slots; payload i is described by header[_P + 4i : _P + 4i + 4] = rows, cols, dtype code, nbytes
_MAGIC, _KIND, _ID, _STATUS, _LAYER, _STEP, _VERSION, _COUNT, _P = range(9)
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8)  # code = index
_CODES = {dt: code for code, dt in enumerate(WIRE_DTYPES)}
_STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}
REQUEST_FIELDS, REPLY_FIELDS, ERROR_FIELDS = ("hidden", "expert_ids", "weights"), ("output",), ("error",)
MAX_ERROR_BYTES = 4096


class BrokenStream(ConnectionError):
    """A header that cannot be framed (bad magic, counts or sizes): the stream from that peer is out of step."""


def encode(kind: int, payloads: Sequence[torch.Tensor] = (), fields: Sequence[str] = (), *, request_id: int = 0,
           status: int = OK, layer: int = 0, step_id: int = 0, version: int = 0) -> tuple[torch.Tensor, list]:
    """-> (header int64[HEADER], payload byte views). Raises ValueError naming the field that cannot travel."""
    h = [0] * HEADER
    h[_MAGIC], h[_KIND], h[_ID], h[_STATUS], h[_LAYER], h[_STEP], h[_VERSION], h[_COUNT] = (
        MAGIC, kind, request_id, status, layer, step_id, version, len(payloads))
    parts = []
    for i, (t, field) in enumerate(zip(payloads, fields, strict=True)):
        if t.dtype not in _CODES:
            raise ValueError(f"{field}: dtype {t.dtype} cannot travel; wire dtypes are {list(WIRE_DTYPES)}")
        if t.dim() != 2:
            raise ValueError(f"{field}: shape {list(t.shape)}, expected 2 dimensions")
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        h[_P + 4 * i:_P + 4 * i + 4] = [t.shape[0], t.shape[1], _CODES[t.dtype], flat.numel()]
        parts.append(flat)
    return torch.tensor(h, dtype=torch.int64), parts


def check_header(h: list[int], max_bytes: int) -> None:
    """Framing checks (before any payload is received); a failure means the stream cannot be trusted further."""
    if len(h) != HEADER or h[_MAGIC] != MAGIC:
        raise BrokenStream(f"header: not a moemesh collective header (magic {h[_MAGIC] if h else None})")
    sizes = [h[_P + 4 * i + 3] for i in range(min(max(h[_COUNT], 0), 3))]
    if h[_KIND] not in (REQUEST, REPLY, PING, CLOSE) or not 0 <= h[_COUNT] <= 3:
        raise BrokenStream(f"header: kind {h[_KIND]} with {h[_COUNT]} payloads")
    if any(not 0 <= s <= max_bytes for s in sizes):
        raise BrokenStream(f"header: payload sizes {sizes} outside [0, {max_bytes}] bytes")


def decode(h: list[int], raws: Sequence[torch.Tensor], fields: Sequence[str]) -> list[torch.Tensor]:
    """Received payload bytes -> tensors [rows, cols] (views). Raises ValueError naming the field."""
    if h[_COUNT] != len(fields):
        raise ValueError(f"message: {h[_COUNT]} tensors, expected {len(fields)} ({', '.join(fields)})")
    out = []
    for i, (raw, field) in enumerate(zip(raws, fields, strict=True)):
        rows, cols, code, nbytes = h[_P + 4 * i:_P + 4 * i + 4]
        if not 0 <= code < len(WIRE_DTYPES):
            raise ValueError(f"{field}.dtype: unknown dtype code {code}")
        dtype = WIRE_DTYPES[code]
        if rows < 0 or cols < 0 or rows * cols * dtype.itemsize != nbytes:
            raise ValueError(f"{field}.data: {nbytes} bytes, but shape [{rows}, {cols}] of {dtype} needs "
                             f"{max(rows, 0) * max(cols, 0) * dtype.itemsize}")
        out.append(raw.view(dtype).reshape(rows, cols))
    return out


def _error_message(request_id: int, exc: BaseException) -> tuple[torch.Tensor, list]:
    code = errors.status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("collective dispatch failed", exc_info=exc)
    text = torch.frombuffer(bytearray(errors._details(exc).encode()[:MAX_ERROR_BYTES]), dtype=torch.uint8)
    return encode(REPLY, [text.reshape(1, -1)], ERROR_FIELDS, request_id=request_id, status=code.value[0])


def _bind_device(device: torch.device) -> None:
    if device.type != "cpu":  # cuda / npu: collectives run on the thread's current device
        getattr(torch, device.type).set_device(device)


# ---- the process group -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CollectiveGroup:
    """This process's membership of one expert group's process groups (what `init_group` returns)."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    requests: dist.ProcessGroup  # worker -> shard
    replies: dist.ProcessGroup  # shard -> worker

    def close(self) -> None:
        """Destroy the process groups (after the transports and servers on them are closed)."""
        dist.destroy_process_group()


def check_backend(backend: str, device: torch.device | str | None = None) -> torch.device:
    """The device tensors travel from for `backend`, or ValueError saying what is missing. Imports torch_npu only
    for "hccl"."""
    if backend == "gloo":
        if not dist.is_gloo_available() or (device is not None and torch.device(device).type != "cpu"):
            raise ValueError(f"backend: 'gloo' needs a torch build with gloo and CPU tensors (device {device})")
        return torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            raise ValueError(f"backend: 'nccl' needs CUDA GPUs and a torch build with NCCL; this torch "
                             f"{torch.__version__} sees cuda={torch.cuda.is_available()} "
                             f"nccl={dist.is_nccl_available()} (use 'gloo' on CPU)")
        return torch.device(device or f"cuda:{torch.cuda.current_device()}")
    if backend == "hccl":
        try:
            importlib.import_module("torch_npu")  # registers the "hccl" backend and torch.npu
        except ImportError as e:
            raise ValueError(f"backend: 'hccl' needs torch_npu (Ascend's PyTorch adapter), which cannot be imported "
                             f"({e}); install it on Ascend hosts, or use 'gloo' on CPU") from None
        if not torch.npu.is_available():
            raise ValueError("backend: 'hccl' needs Ascend NPUs, but torch.npu.is_available() is False")
        return torch.device(device or f"npu:{torch.npu.current_device()}")
    raise ValueError(f"backend: {backend!r} unknown; expected 'nccl', 'hccl' or 'gloo'")


def init_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str = "gloo", *,
               timeout_s: float = 60.0, idle_timeout_s: float = 86400.0, device: torch.device | str | None = None,
               is_master: bool | None = None) -> CollectiveGroup:
    """Join the expert group's process groups through a TCPStore at `master_addr:master_port`.

    Rank 0 hosts the store unless `is_master` says otherwise (e.g. the controller hosts it and every member passes
    False). `timeout_s` bounds the rendezvous; `idle_timeout_s` is the process group's op timeout, and a reader waits
    for the next message that long: keep it above the longest idle gap (NCCL's watchdog aborts older operations).
    The process must not already have a default process group."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} outside 0..{world_size - 1}")
    dev = check_backend(backend, device)
    if dist.is_initialized():
        raise ValueError("init_group: this process already has a default process group")
    store = dist.TCPStore(master_addr, master_port, None, rank == 0 if is_master is None else is_master,
                          timedelta(seconds=timeout_s), wait_for_workers=False)
    idle = timedelta(seconds=idle_timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=idle)
    replies = dist.new_group(list(range(world_size)), timeout=idle, backend=backend)
    return CollectiveGroup(rank, world_size, backend, dev, dist.group.WORLD, replies)


def _check_ranks(group: CollectiveGroup, ranks: Sequence[int], what: str) -> None:
    bad = [r for r in ranks if not 0 <= r < group.world_size or r == group.rank]
    if bad or len(set(ranks)) != len(ranks) or not ranks:
        raise ValueError(f"{what}: ranks must be distinct, non-empty, in 0..{group.world_size - 1} and not this "
                         f"rank {group.rank}; got {list(ranks)}")


class _Link:
    """One peer: an ordered outgoing stream (a single sender thread posts each message's parts back to back) and a
    reader thread that hands every incoming message to `on_message(header, raws)` until the peer sends CLOSE or the
    link breaks, then calls `on_end(error or None)`. After this side sent CLOSE it sends nothing more."""

    def __init__(self, group: CollectiveGroup, peer: int, outgoing, incoming, max_bytes: int,
                 on_message: Callable[[list[int], list], None], on_end: Callable[[BaseException | None], None]):
        self.group, self.peer, self.outgoing, self.incoming, self.max_bytes = group, peer, outgoing, incoming, max_bytes
        self.on_message, self.on_end = on_message, on_end
        self.sent_close = False  # the sender thread's alone
        self.sender = concurrent.futures.ThreadPoolExecutor(1, f"moemesh-p2p-send-{peer}", _bind_device,
                                                            (group.device,))
        self.reader = threading.Thread(target=self._read, name=f"moemesh-p2p-recv-{peer}", daemon=True)

    def start(self) -> _Link:
        self.reader.start()
        return self

    def post(self, header: torch.Tensor, parts: Sequence[torch.Tensor] = ()) -> concurrent.futures.Future:
        """Queue a message -> a future: True once sent, False if dropped (this side already sent CLOSE)."""
        return self.sender.submit(self._send, header, list(parts))

    def post_close(self) -> None:
        try:
            self.post(encode(CLOSE)[0])
        except RuntimeError:  # the sender is shut down: CLOSE went out already
            pass

    def _send(self, header: torch.Tensor, parts: list[torch.Tensor]) -> bool:
        if self.sent_close:
            return False
        self.sent_close = int(header[_KIND]) == CLOSE
        staged = [t.to(self.group.device) for t in (header, *parts) if t.numel()]  # alive until sent
        for work in [dist.isend(t, self.peer, group=self.outgoing) for t in staged]:
            work.wait()
        return True

    def _recv(self) -> tuple[list[int], list[torch.Tensor]]:
        header = torch.empty(HEADER, dtype=torch.int64, device=self.group.device)
        dist.irecv(header, self.peer, group=self.incoming).wait()
        h = header.tolist()
        check_header(h, self.max_bytes)
        raws = [torch.empty(h[_P + 4 * i + 3], dtype=torch.uint8, device=self.group.device) for i in range(h[_COUNT])]
        for work in [dist.irecv(raw, self.peer, group=self.incoming) for raw in raws if raw.numel()]:
            work.wait()  # posted together: gloo and NCCL match a pair's receives with its sends in order
        return h, raws

    def _read(self) -> None:
        _bind_device(self.group.device)
        error = None
        try:
            while True:
                h, raws = self._recv()
                if h[_KIND] == CLOSE:
                    break
                self.on_message(h, raws)
        except Exception as e:  # noqa: BLE001 - a broken link ends this peer's stream; the owner decides what next
            error = e
        self.on_end(error)


# ---- attention worker side -------------------------------------------------------------------------------------------
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
    """Serves `target` (an `actors.expert_shard.ExpertShard`) to the attention workers `peers` (ranks) of `group`.

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
