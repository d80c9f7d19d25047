"""The forward step of an attention worker whose routed experts and Engram tables live in other processes.

The step's sequences are split into micro-batches (contiguous groups of sequences with about equal token counts,
`micro_batches` at most) that take turns layer by layer: micro-batch 0 runs layer i's attention & co and router,
sends its tokens to the expert shards and computes its shared expert; then micro-batch 1 does the same while 0's
tokens are away; then 0 takes its experts' answer and goes on to layer i+1, and so on (the two-batch overlap of
MegaScale-Infer and DeepSeek's inference system). The compute runs on the caller's thread (the engine's step thread)
in a fixed order; the all-to-all runs on the worker's I/O loop, where its gRPC channels live, so the thread waits
only when the micro-batch whose turn it is still has tokens away. With one micro-batch this is the plain
attention -> experts -> attention alternation. Each sequence stays in one micro-batch and every token's math is the
same as without the split, so the tokens are too.

Engram rows are requested as soon as the step's tokens are known (the indices depend only on the tokens) and awaited
only at the first Engram layer, so the lookup hides behind the layers below it. Every step's time is broken down
(`StepTimes`): compute on this thread, waiting on experts, waiting on Engram; `last_trace` keeps the last step's
timeline (what docs/serving.md's overlap picture is drawn from).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from moemesh.actors.attention.token_dispatch import Dispatcher
from moemesh.actors.io_loop import IoLoop
from moemesh.kernels.decode_state import SequenceCache
from moemesh.kernels.model import DeepseekV4, StepInput

# {layer: hash ids [N, O*H]} -> {layer: rows [N, engram_dim]} (the Engram client's `lookup`; not the wire type
# `proto.codec.EngramLookup`)
EngramFetch = Callable[[dict[int, torch.Tensor]], Awaitable[dict[int, torch.Tensor]]]


@dataclass
class StepTimes:
    """Where one step's wall time went, in seconds (`compute` is the rest: attention, norms, mHC, router, shared
    expert, embedding, all on the step thread)."""

    total: float = 0.0
    compute: float = 0.0
    wait_experts: float = 0.0  # idle until the micro-batch whose turn it was got its routed experts' answer
    wait_engram: float = 0.0  # idle at the first Engram layer until the rows arrived
    micro_batches: int = 1


Event = tuple[str, int, int, float, float]  # (kind, micro-batch, layer, start s, end s) from the step's start


class _Trace:
    """One step's timeline: `compute` (a micro-batch's layer up to its MoE input, router and shared expert),
    `experts` (its routed tokens away, send to answer), `wait_experts` / `wait_engram` (this thread idle), `engram`
    (the lookup under way). A few clock reads per layer: always on."""

    def __init__(self):
        self.t0, self.events = time.perf_counter(), []

    def add(self, kind: str, mb: int, layer: int, start: float, end: float | None = None) -> None:
        end = time.perf_counter() if end is None else end
        self.events.append((kind, mb, layer, start - self.t0, end - self.t0))

    def until_done(self, future: Future, kind: str, mb: int, layer: int) -> None:
        """Record `kind` from now until `future` completes (its callback runs on the I/O loop's thread)."""
        start = time.perf_counter()
        future.add_done_callback(lambda _: self.add(kind, mb, layer, start))


class StepParts:
    """Cumulative `StepTimes` of a worker's steps (its metrics and `stats()`); called from the step thread."""

    PARTS = ("compute", "wait_experts", "wait_engram")

    def __init__(self):
        self.steps, self.micro_batches = 0, 0
        self.totals = dict.fromkeys(("total", *self.PARTS), 0.0)

    def add(self, t: StepTimes) -> None:
        self.steps += 1
        self.micro_batches += t.micro_batches
        for part in self.totals:
            self.totals[part] += getattr(t, part)

    def seconds(self, engine_clock=None) -> dict:
        """{steps, micro_batches (summed), total, compute, wait_experts, wait_engram[, scheduling]} in seconds since
        start; `scheduling` (the engine's step beyond the forward pass) when given the engine's `StepClock`."""
        out = {"steps": self.steps, "micro_batches": self.micro_batches, **self.totals}
        if engine_clock is not None:
            out["scheduling"] = engine_clock.scheduling_s
        return out


@dataclass
class _MicroBatch:
    """One micro-batch's place in the layer loop: its step input and generator, the routed answer under way and the
    shared expert's output of its current layer."""

    step: StepInput
    tokens: slice  # its rows of the step's flat token order
    index: int
    trace: _Trace
    gen: object = None
    routed: Future | None = None
    shared: torch.Tensor | None = None
    waits: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [experts, engram]


def split_micro_batches(lengths: Sequence[int], parts: int) -> list[range]:
    """Sequences with `lengths` tokens -> at most `parts` contiguous groups of sequence indices with about equal token
    counts (none empty; a sequence is never split: its attention needs its own earlier tokens of the same layer)."""
    parts = max(1, min(parts, len(lengths)))
    total, groups, start, seen = sum(lengths), [], 0, 0
    for i, n in enumerate(lengths):
        seen += n
        left_groups, left_seqs = parts - len(groups) - 1, len(lengths) - i - 1
        if left_groups and (seen * parts >= total * (len(groups) + 1) or left_seqs == left_groups):
            groups.append(range(start, i + 1))
            start = i + 1
    groups.append(range(start, len(lengths)))
    return groups


class RemoteStep:
    """`step(token_ids, caches) -> hidden [N, D]` with MoE routed experts behind `dispatcher` and Engram rows from
    `engram_lookup` ({layer: hash ids [N, O*H]} -> {layer: rows [N, engram_dim]}). `on_step(StepTimes)` is called
    after every step (metrics)."""

    def __init__(self, model: DeepseekV4, dispatcher: Dispatcher, engram_lookup: EngramFetch | None,
                 io: IoLoop, timeout_s: float = 120.0, engram_latency=None, micro_batches: int = 2,
                 on_step: Callable[[StepTimes], None] | None = None):
        if model.config.has_engram and engram_lookup is None:
            raise ValueError("engram_lookup: the model has Engram layers; give the worker an Engram client")
        if micro_batches < 1:
            raise ValueError(f"micro_batches: must be >= 1, got {micro_batches}")
        self.model, self.dispatcher, self.engram_lookup, self.io = model, dispatcher, engram_lookup, io
        self.timeout_s, self.micro_batches, self.on_step = timeout_s, micro_batches, on_step
        self.engram_latency = engram_latency  # a prometheus Histogram (or None)
        self.last = StepTimes()
        self.last_trace: list[Event] = []
        self.last_shape = (0, 0)  # (sequences, tokens) of the step `last_trace` is of
        self._step_ids = itertools.count()

    def __call__(self, token_ids: Sequence[Sequence[int]], caches: Sequence[SequenceCache]) -> torch.Tensor:
        trace = _Trace()
        started = trace.t0
        step_id, pending = next(self._step_ids), []
        try:
            with torch.inference_mode():
                engram = self._request_engram(token_ids, caches, trace)
                pending.append(engram)
                parts = self._begin(token_ids, caches, trace)
                for block in self.model.layers:
                    for mb in parts:
                        y = self._moe_output(mb)  # None before the first layer
                        if block.engram is not None and block.layer not in mb.step.engram_rows:
                            self._engram_rows(mb, engram)
                        self._send(mb, block, y, step_id)
                        pending.append(mb.routed)
                hidden = torch.cat([self._finish(mb) for mb in parts])
        finally:
            for future in pending:  # a failed step leaves nothing running on the I/O loop
                if future is not None and not future.done():
                    future.cancel()
        self._record(parts, time.perf_counter() - started)
        self.last_trace = trace.events
        self.last_shape = (len(token_ids), int(hidden.shape[0]))
        return hidden

    # -- the parts of a step ------------------------------------------------------------------------------------------
    def _request_engram(self, token_ids, caches, trace: _Trace) -> Future | None:
        """Start the step's Engram lookup on the I/O loop now; it is awaited at the first Engram layer."""
        if not self.model.config.has_engram:
            return None
        hash_ids = self.model.engram_hash_ids(token_ids, caches)
        future = asyncio.run_coroutine_threadsafe(self._timed_lookup(hash_ids), self.io.loop)
        trace.until_done(future, "engram", -1, -1)
        return future

    async def _timed_lookup(self, hash_ids: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        started = time.perf_counter()
        rows = await self.engram_lookup(hash_ids)
        if self.engram_latency is not None:
            self.engram_latency.observe(time.perf_counter() - started)
        return rows

    def _begin(self, token_ids, caches, trace: _Trace) -> list[_MicroBatch]:
        lengths = [len(ids) for ids in token_ids]
        parts, first = [], 0
        for group in split_micro_batches(lengths, self.micro_batches):
            n = sum(lengths[i] for i in group)
            step = self.model.begin_step([token_ids[i] for i in group], [caches[i] for i in group], engram_rows={})
            parts.append(_MicroBatch(step, slice(first, first + n), len(parts), trace))
            first += n
        return parts

    def _engram_rows(self, mb: _MicroBatch, engram: Future) -> None:
        """Give the micro-batch its slice of every Engram layer's rows (waiting for the lookup if it is not back)."""
        started = time.perf_counter()
        rows = engram.result(self.timeout_s)
        mb.waits[1] += time.perf_counter() - started
        mb.trace.add("wait_engram", mb.index, -1, started)
        mb.step.engram_rows.update({layer: r[mb.tokens] for layer, r in rows.items()})

    def _send(self, mb: _MicroBatch, block, y: torch.Tensor | None, step_id: int) -> None:
        """Finish the previous layer with `y` and run this layer up to its MoE input; send the routed part away and
        compute the shared expert meanwhile."""
        started = time.perf_counter()
        if mb.gen is None:
            mb.gen, y = self.model.layer_loop(mb.step), None
        got, x = mb.gen.send(y)  # x [n, D]
        if got is not block:
            raise RuntimeError(f"layer loop out of step: at layer {got.layer}, expected {block.layer}")
        weights, indices = block.ffn.gate(x, mb.step.token_ids)
        mb.routed = asyncio.run_coroutine_threadsafe(
            self.dispatcher(block.layer, x, indices, weights, step_id), self.io.loop)
        mb.trace.until_done(mb.routed, "experts", mb.index, block.layer)
        mb.shared = block.ffn.shared_experts(x)
        mb.trace.add("compute", mb.index, block.layer, started)

    def _moe_output(self, mb: _MicroBatch) -> torch.Tensor | None:
        """The micro-batch's last MoE output (routed answer + shared expert), waiting for the answer if needed."""
        if mb.routed is None:
            return None
        started = time.perf_counter()
        routed = mb.routed.result(self.timeout_s)
        mb.waits[0] += time.perf_counter() - started
        mb.trace.add("wait_experts", mb.index, -1, started)
        return routed + mb.shared

    def _finish(self, mb: _MicroBatch) -> torch.Tensor:
        y = self._moe_output(mb)
        try:
            mb.gen.send(y)
        except StopIteration as done:
            return self.model.end_step(mb.step, done.value)
        raise RuntimeError("layer loop out of step: it has more layers than the model")

    def _record(self, parts: list[_MicroBatch], total: float) -> None:
        experts, engram = (sum(mb.waits[i] for mb in parts) for i in (0, 1))
        self.last = StepTimes(total, max(total - experts - engram, 0.0), experts, engram, len(parts))
        if self.on_step is not None:
            self.on_step(self.last)
