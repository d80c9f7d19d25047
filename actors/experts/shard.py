"""Expert shard: the routed experts that a plan assigns to one process, served to every attention worker.

`ExpertShard` is a plain class (no Ray, no gRPC): it holds an `ExpertBank` per MoE layer for any subset of that
layer's experts, validates incoming `TokenBatch`es, and batches without idling: a request that finds the shard idle
runs at once (after the current event-loop pass, so requests that arrived together run together); requests that
arrive while a computation runs wait for it and then run as ONE grouped computation per layer (or sooner, once
`max_tokens` tokens are queued), whose result is split back per request. `max_wait_s` > 0 adds a fixed wait for
others even when idle (worth it only with many attention workers whose requests arrive spread out). Each reply is, per token, the weighted sum over the token's experts held here, so the caller
combines shards with one add per destination. `server.serve_expert_shard` puts it behind `grpc.aio`.

Shapes: n = tokens, k = expert slots per token, D = hidden, E = routed experts per layer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from moemesh.kernels.config import ModelConfig
from moemesh.kernels.moe import ExpertBank
from moemesh.kernels.packed import PackedExperts, Scratch, check_scales
from moemesh.proto import errors
from moemesh.proto.codec import FLOAT_DTYPES, INT_DTYPES, TokenBatch

# (layer, expert ids) -> {canonical name: tensor as stored, FP8/FP4 weights with their scales}, e.g.
# `partial(Checkpoint(path).read_experts, dequantize=False)`; float tensors (an unquantized checkpoint) work too.
ExpertLoader = Callable[[int, Sequence[int]], Mapping[str, torch.Tensor]]


class BatchingConfig(BaseModel):
    """How an expert shard groups requests into computations."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_wait_s: float = Field(0.0, ge=0, description="Extra wait of a layer's first queued request for others when "
                              "the shard is idle (0: none; requests arriving while it computes are merged anyway).")
    max_tokens: int = Field(4096, gt=0, description="A layer's queue runs as soon as it holds this many tokens.")
    decoded_cache: float = Field(
        0.2, ge=0, le=8, description="Decoded experts kept for reuse, as a fraction of the shard's packed expert bytes "
                                     "(kernels/packed.py `Scratch.decoded`): the micro-batches of a step bring the "
                                     "same layer one after the other. 0: decode every time.")
    max_pending_tokens: int = Field(
        1 << 18, gt=0, description="Accepted-but-unanswered tokens beyond which new requests get Overloaded "
                                   "(RESOURCE_EXHAUSTED); a request arriving when nothing is pending is always taken.")


@dataclass
class ShardCounters:
    """Plain counters for metrics. bytes_* count tensor payload bytes (hidden + ids + weights in, output out)."""

    requests: int = 0  # accepted (valid, not refused)
    batches: int = 0  # grouped expert computations run
    tokens: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: int = 0  # requests refused as Overloaded
    compute_s: float = 0.0  # seconds spent computing batches (the expert-compute part of a served step)
    tokens_per_expert: dict[int, dict[int, int]] = field(default_factory=dict)  # layer -> expert id -> tokens


@dataclass
class _Queue:
    """Requests of one layer waiting to run together."""

    entries: list[tuple[TokenBatch, asyncio.Future]] = field(default_factory=list)
    tokens: int = 0
    timer: asyncio.TimerHandle | None = None


def load_banks(cfg: ModelConfig, assignment: Mapping[int, Sequence[int]], loader: ExpertLoader,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict[int, ExpertBank]:
    """{layer: expert ids} -> {layer: packed ExpertBank} from `loader(layer, ids)`, one layer at a time: the weights
    stay as stored (never dequantized in full, not even while loading); float ones are cast to `dtype`, the compute
    dtype. The banks share one decode scratch. Errors name the tensor or layer."""
    banks, scratch = {}, Scratch()
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    for layer, ids in sorted(assignment.items()):
        if not 0 <= layer < cfg.num_hidden_layers:
            raise ValueError(f"assignment: layer {layer} out of range 0..{cfg.num_hidden_layers - 1}")
        bad = [e for e in ids if not 0 <= e < cfg.n_routed_experts]
        if not ids or bad:
            raise ValueError(f"assignment[{layer}]: expert ids must be a non-empty subset of "
                             f"0..{cfg.n_routed_experts - 1}, got {list(ids)}")
        held = sorted(set(ids))
        shapes = {"w1": (I, D), "w2": (D, I), "w3": (I, D)}
        packed = PackedExperts.from_stored(loader(layer, held), layer, held, shapes)
        for part in ("w1", "w2", "w3"):
            check_scales(getattr(packed, part), f"layers.{layer}.ffn.experts.{part}")
        packed = packed.float_as(dtype).to(device)
        banks[layer] = ExpertBank(cfg, held, packed=packed, compute_dtype=dtype, scratch=scratch).to(device).eval()
    return banks


class ExpertShard:
    """Routed experts of some MoE layers, with request batching. Use from one event loop.

    `dispatch` is the whole API for callers; `counters` and `health` are for metrics and health checks."""

    def __init__(self, cfg: ModelConfig, banks: Mapping[int, ExpertBank], *, expert_map_version: int = 0,
                 batching: BatchingConfig | None = None):
        self.cfg, self.banks = cfg, dict(banks)
        self.expert_map_version = expert_map_version
        self.batching = batching or BatchingConfig()
        self.counters = ShardCounters(tokens_per_expert={layer: {} for layer in self.banks})
        for scratch in {id(b.scratch): b.scratch for b in self.banks.values() if b.is_packed}.values():
            scratch.cache_bytes = int(self.batching.decoded_cache * self.expert_bytes)
        self._queues: dict[int, _Queue] = {}
        self._pending_tokens = 0
        self._tasks: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-shard")
        self._computing = 0  # computations handed to the executor and not finished
        self._closed = False

    @classmethod
    def from_loader(cls, cfg: ModelConfig, assignment: Mapping[int, Sequence[int]], loader: ExpertLoader, *,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **kw) -> "ExpertShard":
        """Load the experts `{layer: [expert ids]}` through `loader(layer, ids) -> {canonical name: tensor}`."""
        banks = load_banks(cfg, assignment, loader, dtype, device)
        release_freed_heap()  # loading's per-layer staging is freed, but glibc keeps it resident otherwise
        return cls(cfg, banks, **kw)

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, assignment: Mapping[int, Sequence[int]],
                     tensors: Mapping[str, torch.Tensor], **kw) -> "ExpertShard":
        """Take the experts `{layer: [expert ids]}` from a dict of canonical name -> tensor (extra names ignored)."""
        return cls.from_loader(cfg, assignment, lambda layer, ids: tensors, **kw)

    @property
    def assignment(self) -> dict[int, list[int]]:
        """{layer: expert ids held}."""
        return {layer: list(bank.expert_ids) for layer, bank in self.banks.items()}

    @property
    def serving(self) -> bool:
        return not self._closed

    async def dispatch(self, batch: TokenBatch) -> torch.Tensor:
        """-> [n, D] in `batch.hidden`'s dtype: per token, Σ over its experts held here of weight · expert(hidden).

        Raises NotHeld (layer not held), StaleExpertMap, ValueError (malformed field, named), Overloaded,
        Unavailable (closed)."""
        if self._closed:
            raise errors.Unavailable("expert shard is closed")
        self._validate(batch)
        n, limit = batch.n_tokens, self.batching.max_pending_tokens
        if self._pending_tokens and self._pending_tokens + n > limit:
            self.counters.rejected += 1
            raise errors.Overloaded(f"expert shard has {self._pending_tokens} tokens pending (limit {limit}); "
                                    f"cannot take {n} more")
        self.counters.requests += 1
        self.counters.bytes_in += batch.nbytes
        if n == 0:
            return torch.zeros(0, self.cfg.hidden_size, dtype=batch.hidden.dtype)
        self._pending_tokens += n
        try:
            out = await self._enqueue(batch)
        finally:
            self._pending_tokens -= n
        self.counters.bytes_out += out.numel() * out.element_size()
        return out

    def _validate(self, batch: TokenBatch) -> None:
        if batch.layer not in self.banks:
            raise errors.NotHeld(f"layer: {batch.layer} is not held by this shard (holds {sorted(self.banks)})")
        if batch.expert_map_version < self.expert_map_version:  # routed by a map made before this shard joined
            raise errors.StaleExpertMap(f"expert_map_version: request routed with {batch.expert_map_version}, "
                                        f"this shard serves maps from {self.expert_map_version} on")
        D, E = self.cfg.hidden_size, self.cfg.n_routed_experts
        hidden, ids, weights = batch.hidden, batch.expert_ids, batch.weights
        _check(hidden, "hidden", FLOAT_DTYPES, hidden.dim() == 2 and hidden.shape[1] == D, f"[n, {D}]")
        n = hidden.shape[0]
        _check(ids, "expert_ids", INT_DTYPES, ids.dim() == 2 and ids.shape[0] == n, f"[{n}, k]")
        _check(weights, "weights", ("float32",), weights.shape == ids.shape, f"{list(ids.shape)} (as expert_ids)")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= E):
            raise ValueError(f"expert_ids: values must lie in [-1, {E}), got min {int(ids.min())} "
                             f"max {int(ids.max())}")

    def _enqueue(self, batch: TokenBatch) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(batch.layer, _Queue())
        future = loop.create_future()
        queue.entries.append((batch, future))
        queue.tokens += batch.n_tokens
        if queue.tokens >= self.batching.max_tokens:
            self._flush(batch.layer)
        elif queue.timer is None and not self._computing:  # busy: the queue runs when the computation ends
            wait = self.batching.max_wait_s
            queue.timer = (loop.call_later(wait, self._flush, batch.layer) if wait > 0
                           else loop.call_soon(self._flush, batch.layer))
        return future

    def _flush(self, layer: int) -> None:
        queue = self._queues.pop(layer, None)
        if queue is None:
            return
        if queue.timer is not None:
            queue.timer.cancel()
        self._computing += 1
        task = asyncio.get_running_loop().create_task(self._run(layer, queue.entries))
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._computed)

    def _computed(self, _task) -> None:
        """A computation ended: once none runs, the queues that formed meanwhile run (one grouped batch each)."""
        self._computing -= 1
        if not self._computing:
            for layer in [layer for layer, q in self._queues.items() if q.timer is None]:
                self._flush(layer)

    async def _run(self, layer: int, entries: list[tuple[TokenBatch, asyncio.Future]]) -> None:
        batches = [b for b, _ in entries]
        loop = asyncio.get_running_loop()
        try:  # in a worker thread: the event loop keeps taking requests (they form the next batch) meanwhile
            outputs, per_expert = await loop.run_in_executor(self._executor, self._timed_compute, layer, batches)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            for _, future in entries:
                if not future.done():
                    future.set_exception(exc)
            return
        self.counters.batches += 1
        self.counters.tokens += sum(b.n_tokens for b in batches)
        seen = self.counters.tokens_per_expert[layer]
        for expert, count in per_expert.items():
            seen[expert] = seen.get(expert, 0) + count
        for (_, future), out in zip(entries, outputs):
            if not future.done():  # the caller may have given up (cancelled RPC)
                future.set_result(out)

    def _timed_compute(self, layer: int, batches: list[TokenBatch]) -> tuple[list[torch.Tensor], dict[int, int]]:
        started = time.perf_counter()
        try:
            return self._compute(layer, batches)
        finally:
            self.counters.compute_s += time.perf_counter() - started

    @torch.no_grad()
    def _compute(self, layer: int, batches: list[TokenBatch]) -> tuple[list[torch.Tensor], dict[int, int]]:
        """One grouped computation over the concatenated requests -> (output per request, tokens per expert)."""
        bank = self.banks[layer]
        device, dtype = bank.device, bank.dtype
        k = max(b.expert_ids.shape[1] for b in batches)  # requests may carry fewer slots: pad with empty ones
        x = torch.cat([b.hidden.to(device, dtype) for b in batches])  # [N, D]
        ids = torch.cat([F.pad(b.expert_ids.long(), (0, k - b.expert_ids.shape[1]), value=-1) for b in batches])
        w = torch.cat([F.pad(b.weights, (0, k - b.weights.shape[1])) for b in batches])  # [N, k]
        y = bank(x, ids.to(device), w.to(device))  # [N, D]
        slots = bank.slot_of[ids.reshape(-1).to(device)]
        counts = torch.bincount(slots[slots >= 0], minlength=len(bank.expert_ids)).tolist()
        per_expert = {e: c for e, c in zip(bank.expert_ids, counts) if c}
        parts = y.split([b.n_tokens for b in batches])
        return [p.to("cpu", b.hidden.dtype) for p, b in zip(parts, batches)], per_expert

    @property
    def expert_bytes(self) -> int:
        """Bytes of the routed-expert weights held (packed: data + scales)."""
        return sum(bank.expert_bytes for bank in self.banks.values())

    def memory(self) -> dict[str, int]:
        """{expert_bytes, scratch_bytes (decode buffers), rss_bytes, peak_rss_bytes} of this shard and its process."""
        scratch = {id(b.scratch): b.scratch.nbytes for b in self.banks.values()}
        return {"expert_bytes": self.expert_bytes, "scratch_bytes": sum(scratch.values()), **process_memory()}

    def health(self) -> str:
        """One line for health checks and logs."""
        layers = {layer: len(bank.expert_ids) for layer, bank in sorted(self.banks.items())}
        return (f"{'serving' if self.serving else 'closed'}; experts per layer {layers}; "
                f"{self._pending_tokens} tokens pending")

    def close(self) -> None:
        """Stop taking requests (they get Unavailable) and release the worker thread."""
        self._closed = True
        self._executor.shutdown(wait=False)


def release_freed_heap() -> None:
    """Hand memory freed to the C heap back to the OS (glibc `malloc_trim`; the roles run with a 1 GiB trim
    threshold, cluster/serve/edge.py, so without this a shard keeps its load-time staging resident). No-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def process_memory() -> dict[str, int]:
    """{rss_bytes: resident now, peak_rss_bytes: the most ever resident} of this process (Linux /proc)."""
    import resource

    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"rss_bytes": resident_pages * os.sysconf("SC_PAGE_SIZE"), "peak_rss_bytes": peak}


def _check(t: torch.Tensor, name: str, dtypes: tuple[str, ...], shape_ok: bool, expected: str) -> None:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in dtypes:
        raise ValueError(f"{name}: dtype {dtype} not allowed; expected one of {list(dtypes)}")
    if not shape_ok:
        raise ValueError(f"{name}: shape {list(t.shape)}, expected {expected}")
