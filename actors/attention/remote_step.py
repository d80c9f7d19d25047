"""The forward step of an attention worker whose routed experts and Engram tables live in other processes.

Per step: hash the step's tokens and fetch every Engram layer's rows (before layer 0: the indices depend only on the
tokens), then drive the model's own layer loop (`DeepseekV4.layer_loop`: attention & co run locally) and answer each
layer's MoE input: route, send each token once per destination shard, compute the shared expert while the routed
experts are away, and hand back the sum. The step is a coroutine on the worker's I/O loop (where
its gRPC channels live); `__call__` is the synchronous form the engine's step thread uses.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence

import torch

from moemesh.actors.attention.token_dispatch import Dispatcher
from moemesh.actors.io_loop import IoLoop
from moemesh.kernels.decode_state import SequenceCache
from moemesh.kernels.model import DeepseekV4

# {layer: hash ids [N, O*H]} -> {layer: rows [N, engram_dim]} (the Engram client's `lookup`; not the wire type
# `proto.codec.EngramLookup`)
EngramFetch = Callable[[dict[int, torch.Tensor]], Awaitable[dict[int, torch.Tensor]]]


class RemoteStep:
    """`step(token_ids, caches) -> hidden [N, D]` with MoE routed experts behind `dispatcher` and Engram rows from
    `engram_lookup` ({layer: hash ids [N, O*H]} -> {layer: rows [N, engram_dim]})."""

    def __init__(self, model: DeepseekV4, dispatcher: Dispatcher, engram_lookup: EngramFetch | None,
                 io: IoLoop, timeout_s: float = 120.0, engram_latency=None):
        if model.config.has_engram and engram_lookup is None:
            raise ValueError("engram_lookup: the model has Engram layers; give the worker an Engram client")
        self.model, self.dispatcher, self.engram_lookup, self.io = model, dispatcher, engram_lookup, io
        self.timeout_s = timeout_s
        self.engram_latency = engram_latency  # a prometheus Histogram (or None)
        self._step_ids = itertools.count()

    def __call__(self, token_ids: Sequence[Sequence[int]], caches: Sequence[SequenceCache]) -> torch.Tensor:
        return self.io.run(self.run(token_ids, caches), timeout=self.timeout_s)

    async def run(self, token_ids: Sequence[Sequence[int]], caches: Sequence[SequenceCache]) -> torch.Tensor:
        model, step_id = self.model, next(self._step_ids)
        rows = None
        if model.config.has_engram:
            started = time.perf_counter()
            rows = await self.engram_lookup(model.engram_hash_ids(token_ids, caches))
            if self.engram_latency is not None:
                self.engram_latency.observe(time.perf_counter() - started)
        with torch.inference_mode():
            step = model.begin_step(token_ids, caches, rows)
            loop, y = model.layer_loop(step), None  # the model's own layer loop; only the MoE differs
            while True:
                try:
                    block, x = loop.send(y)  # x [N, D]
                except StopIteration as done:
                    return model.end_step(step, done.value)
                weights, indices = block.ffn.gate(x, step.token_ids)
                routed = asyncio.ensure_future(self.dispatcher(block.layer, x, indices, weights, step_id))
                shared = await asyncio.to_thread(_no_grad(block.ffn.shared_experts), x)  # overlaps the all-to-all
                y = (await routed) + shared  # [N, D]


def _no_grad(fn):
    def wrapped(*args):
        with torch.inference_mode():
            return fn(*args)
    return wrapped
