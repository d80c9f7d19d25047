"""The collective transport's lower half: its process groups (`init_group`), the message framing (a header of
int64[HEADER] and raw payloads) and one peer link (ordered sender, reader thread). See proto/collective.py for the
transport built on it and the framing's rules."""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
import torch
import torch.distributed as dist

from moemesh.proto import errors

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
