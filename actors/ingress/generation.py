"""What the ingress asks of attention workers, and how it runs one HTTP request on one of them.

`Worker` is the interface (an attention worker, or a client of one such as a Serve handle adapter): `generate`
streams `Delta`s for one sequence with `RequestParams`. `LeastLoadedRouter` picks the worker for a request.
`Generation` runs the sequences of one request (its
choices: n per prompt) as concurrent streams and merges them; each `Choice` turns its deltas into text
(detokenized here, the one place that does, and cut at stop strings) and keeps the timings the metrics need.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from moemesh.actors.ingress.logprobs import LogprobsBuffer
from moemesh.actors.ingress.prefix_routing import PrefixAffinity, PrefixRoutingConfig
from moemesh.actors.ingress.protocol import OpenAIError, WorkerError, too_many_requests, unavailable
from moemesh.actors.ingress.text import IncrementalDecoder, StopCutter
from moemesh.actors.request import Delta, FinishReason, RequestParams

log = logging.getLogger(__name__)


# ---- the worker interface ------------------------------------------------------------------------------------------
class WorkerLost(ConnectionError):
    """The worker died or cannot be reached (not a problem of the request): the ingress re-admits the request on
    another worker."""


@runtime_checkable
class Worker(Protocol):
    """An attention worker (or a client of one) as the ingress sees it.

    - `generate` returns an async iterator of `Delta`s (an `async def` with `yield` qualifies); the last one has
      `finish_reason` set. Raise `ValueError` for parameters the worker refuses (the client gets 400) and
      `WorkerLost` when the worker itself is gone (the request moves to another worker, re-prefilling its prompt plus
      the tokens already generated); any other exception fails the request with 503. When the ingress stops iterating
      (client gone, stop string found) it cancels the iteration and calls `abort`.
    - `load` is the worker's queue depth (running + waiting requests), for least-loaded routing.
    - `abort` frees the request's resources (KV blocks); unknown or finished ids are ignored.
    """

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: RequestParams) -> AsyncIterator[Delta]: ...

    async def load(self) -> float: ...

    async def abort(self, request_id: str) -> None: ...


@runtime_checkable
class ElasticWorker(Worker, Protocol):
    """A `Worker` over a pool of replicas that grows and shrinks by itself (Serve's autoscaler), each sequence going
    to one of them. The router fills the fixed workers first: it sends work here only when every fixed worker holds
    `spill_at` sequences or more, so the pool's load is the overflow and the pool empties when the fixed workers
    suffice.

    - `replicas()`: how many serve now (a cached count, cheap). At 0 the router does not call `load` (the call would
      wait for a replica) and, when it would have spilled, calls `wake()`: start a replica (without waiting for it;
      the request goes to a fixed worker meanwhile).
    - `load()`: sequences per replica.
    """

    spill_at: float

    def replicas(self) -> int: ...

    def wake(self) -> None: ...


# ---- routing -------------------------------------------------------------------------------------------------------
class LeastLoadedRouter:
    """Picks the worker with the smallest `load()`; ties go round-robin. Workers that fail or do not answer within
    `timeout_s` are skipped for this pick; with none left the request gets 503. With `max_load`, a request that
    finds every answering worker at or above it gets 429 (Retry-After `retry_after_s`) instead of queueing.
    An `ElasticWorker` (a pool) is a candidate only while no fixed worker is below its `spill_at`. With
    `prefix_routing`, a request's prompt goes to the worker that was sent its longest prefix, unless that one is busier
    than the least loaded by more than the config's `spill` (`PrefixAffinity`, prefix_routing.py)."""

    def __init__(self, workers: Sequence[Worker], timeout_s: float = 2.0, max_load: float | None = None,
                 retry_after_s: int = 1, prefix_routing: PrefixRoutingConfig | None = None):
        if not workers:
            raise ValueError("workers: at least one is needed")
        self.workers = list(workers)
        self._elastic = [isinstance(w, ElasticWorker) for w in self.workers]
        self._timeout_s, self._max_load, self._retry_after_s = timeout_s, max_load, retry_after_s
        self._next = 0
        self._down_until: dict[int, float] = {}  # worker index -> monotonic time until which it is skipped
        self.readmits: deque[dict] = deque(maxlen=256)  # the last requests moved off a lost worker (Generation)
        self.affinity = PrefixAffinity(prefix_routing) if prefix_routing is not None else None

    def mark_down(self, worker: Worker, for_s: float) -> None:
        """Skip `worker` for `for_s` seconds (it was lost; Serve is restarting it)."""
        for i, w in enumerate(self.workers):
            if w is worker:
                self._down_until[i] = time.monotonic() + for_s
                if self.affinity is not None:
                    self.affinity.forget(i)

    async def loads(self) -> list[float | None]:
        """Each worker's load, None where it failed, timed out, is marked down or is a pool with no replica."""
        now = time.monotonic()
        asked = [self._down_until.get(i, 0.0) <= now and (not self._elastic[i] or w.replicas() > 0)
                 for i, w in enumerate(self.workers)]
        return list(await asyncio.gather(*(self._load(w) if ask else _none()
                                           for w, ask in zip(self.workers, asked))))

    async def pick(self, limit: bool = True, prompt: Sequence[int] = ()) -> Worker:
        """The least loaded worker (pools only once the fixed workers are full, see `ElasticWorker`), or with prefix
        routing the one holding `prompt`'s prefix; `limit=False` ignores `max_load` (a re-admitted request was
        already admitted once)."""
        loads = await self.loads()
        alive = self._spill([i for i, load in enumerate(loads) if load is not None], loads)
        if not alive:
            raise unavailable("no attention worker is available", code="no_worker")
        best = min(loads[i] for i in alive)
        if limit and self._max_load is not None and best >= self._max_load:
            raise too_many_requests(f"every attention worker is full ({best:g} sequences or more each); retry later",
                                    self._retry_after_s, code="workers_full")
        n = len(self.workers)
        hashes = self.affinity.chain(prompt) if self.affinity is not None else []
        chosen = self.affinity.prefer(hashes, alive, loads) if hashes else None
        if chosen is None:
            chosen = min((i for i in alive if loads[i] == best), key=lambda i: (i - self._next) % n)
            self._next = (chosen + 1) % n
        if hashes:
            self.affinity.record(hashes, chosen)
        return self.workers[chosen]

    def _spill(self, alive: list[int], loads: list[float | None]) -> list[int]:
        """`alive` without the pools the fixed workers do not overflow into yet; wakes an empty pool they would."""
        fixed_best = min((loads[i] for i in alive if not self._elastic[i]), default=math.inf)
        spilling = {i for i, w in enumerate(self.workers) if self._elastic[i] and fixed_best >= w.spill_at}
        for i in spilling:
            if self.workers[i].replicas() == 0:
                self.workers[i].wake()
        return [i for i in alive if not self._elastic[i] or i in spilling]

    async def _load(self, worker: Worker) -> float | None:
        try:
            load = float(await asyncio.wait_for(worker.load(), self._timeout_s))
        except Exception as e:  # a dead or slow worker is skipped, not fatal
            log.warning("worker %r: load() failed: %r", worker, e)
            return None
        return load if math.isfinite(load) else None


async def _none() -> None:
    return None


# ---- one request's choices on a worker -----------------------------------------------------------------------------
@dataclass
class Choice:
    """One choice: the worker sequence behind it, its text so far and its logprobs not yet sent (`logprobs`, when
    asked). `echo_only`: max_tokens 0 with echo; the worker generates one token (its prompt logprobs come with it),
    which is dropped: the answer is the prompt alone, finish_reason "length" (vLLM does the same)."""

    index: int
    request_id: str  # the worker's id for this sequence
    prompt_ids: list[int]
    params: RequestParams
    decoder: IncrementalDecoder
    cutter: StopCutter
    echo: str = ""
    tokens: int = 0
    finish_reason: FinishReason | None = None
    worker_done: bool = False
    first_token_at: float | None = None
    finished_at: float | None = None
    logprobs: LogprobsBuffer | None = None
    echo_only: bool = False
    prompt: int = 0  # which prompt of the request (its n choices share one)
    cached_tokens: int | None = None  # prompt tokens the (first) worker found in its prefix cache, when it says

    def feed(self, delta: Delta, now: float) -> None:
        """Take one delta: count tokens, decode, keep logprobs, cut at a stop string (which finishes the choice)."""
        if delta.token_ids and self.first_token_at is None:
            self.first_token_at = now
        if self.cached_tokens is None:
            self.cached_tokens = delta.cached_tokens
        if self.echo_only:
            delta = replace(delta, token_ids=[], completion_tokens=0, logprobs=None,
                            finish_reason="length" if delta.finish_reason == "stop" else delta.finish_reason)
        if self.logprobs is not None:
            if delta.prompt_logprobs is not None:
                self.logprobs.add_prompt(self.prompt_ids, delta.prompt_logprobs)
            self.logprobs.add(delta.token_ids, delta.logprobs)
        self.tokens = delta.completion_tokens if delta.completion_tokens is not None else \
            self.tokens + len(delta.token_ids)
        text = self.decoder.push(self._visible(delta))
        if delta.finish_reason:
            self.worker_done = True
            text += self.decoder.flush()
        if self.cutter.add(text):
            self.finish("stop", now)
        elif delta.finish_reason:
            self.finish(delta.finish_reason, now)

    def _visible(self, delta: Delta) -> list[int]:
        """The ids whose text the client sees: a `stop_token_ids` id that ended the sequence is not shown (as in vLLM;
        eos and other special tokens decode to nothing)."""
        ids = delta.token_ids
        if delta.finish_reason == "stop" and ids and ids[-1] in self.params.stop_token_ids:
            return ids[:-1]
        return ids

    def finish(self, reason: FinishReason, now: float) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.finished_at = reason, now

    def release(self) -> str:
        """Text that can go to the client now (all of it once finished)."""
        out, self.echo = self.echo + self.cutter.release(final=self.finish_reason is not None), ""
        return out


@dataclass(frozen=True)
class ReadmitPolicy:
    """How a request whose worker was lost moves on: at most `max_readmits` moves per choice, each waiting at most
    `timeout_s` for a worker to take it; the lost worker is skipped by routing for `down_for_s`."""

    max_readmits: int = 3
    timeout_s: float = 60.0
    down_for_s: float = 5.0
    retry_every_s: float = 1.0


class Generation:
    """Runs one HTTP request's choices on one worker, one stream each, and merges their deltas.

    `events()` yields each choice that has new text or just finished; `close()` (idempotent, never awaits, so it is
    safe under cancellation) stops the streams and aborts every sequence the worker has not finished. With a
    `router`, a choice whose worker is lost (`WorkerLost`) is re-admitted on another worker with its prompt plus the
    tokens it already got as the new prompt (greedy output is unchanged; sampled output continues from a fresh
    generator); the client sees one uninterrupted answer. Each move is recorded in `router.readmits`."""

    def __init__(self, worker: Worker, choices: list[Choice], idle_timeout_s: float, prompt_tokens: int,
                 started_at: float | None = None, router: LeastLoadedRouter | None = None,
                 readmit: ReadmitPolicy | None = None):
        self.worker, self.choices, self.prompt_tokens = worker, choices, prompt_tokens
        self.router, self.readmit = router, readmit or ReadmitPolicy()
        self._idle_timeout_s = idle_timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()  # bounded by the choices' max_tokens (one delta per token)
        self._tasks: dict[int, asyncio.Task] = {}
        self._on: dict[int, tuple[Worker, str]] = {c.index: (worker, c.request_id) for c in choices}
        self.started_at = time.perf_counter() if started_at is None else started_at  # request arrival
        self.closed = False

    def start(self) -> None:
        for c in self.choices:
            self._tasks[c.index] = asyncio.create_task(self._pump(c))

    async def events(self) -> AsyncIterator[Choice]:
        live = {c.index: c for c in self.choices}
        while live:
            try:
                index, item = await asyncio.wait_for(self._queue.get(), self._idle_timeout_s)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise WorkerError(f"no token for {self._idle_timeout_s:g} s") from TimeoutError()
            choice = live.get(index)
            if choice is None:  # finished by the ingress (stop string): what the worker sent meanwhile is dropped
                continue
            if isinstance(item, BaseException):
                raise WorkerError(str(item)) from item
            choice.feed(item, time.perf_counter())
            if choice.finish_reason:
                del live[index]
                self._stop(choice)
            yield choice

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.perf_counter()
        for c in self.choices:
            c.finish("abort", now)
            self._stop(c)

    def _stop(self, choice: Choice) -> None:
        task = self._tasks.pop(choice.index, None)
        if task is not None and not task.done():
            task.cancel()
        if not choice.worker_done:
            choice.worker_done = True
            worker, request_id = self._on[choice.index]
            _spawn(worker.abort(request_id))

    async def _pump(self, choice: Choice) -> None:
        """Stream the choice's deltas into the queue, moving it to another worker when its worker is lost."""
        worker, got, moves, record = self.worker, [], 0, None
        while True:
            try:
                await self._stream(worker, choice, got, moves, record)
                return
            except WorkerLost as e:
                if self.router is None or moves >= self.readmit.max_readmits:
                    self._queue.put_nowait((choice.index, e))
                    return
                moves += 1
                try:
                    worker, record = await self._move(worker, choice, got, e)
                except Exception as e2:
                    self._queue.put_nowait((choice.index, e2))
                    return
            except Exception as e:
                self._queue.put_nowait((choice.index, e))
                return

    async def _stream(self, worker: Worker, choice: Choice, got: list[int], moves: int, record: dict | None) -> None:
        """One worker's stream of the choice; after a move the prompt is the original prompt + `got`, and the deltas
        are rebased (cumulative counts); the first one stamps the move's `record` resumed."""
        request_id = choice.request_id if not moves else f"{choice.request_id}-m{moves}"
        self._on[choice.index] = (worker, request_id)
        params = choice.params
        if got:  # fed as on the lost worker (prompt, then one chunk per token): the continuation is exact
            params = params.model_copy(update={"max_tokens": params.max_tokens - len(got), "prompt_logprobs": None,
                                               "replay_chunks": [len(choice.prompt_ids)] + [1] * len(got)})
        offset = len(got)
        stream = None
        try:
            stream = worker.generate(request_id, choice.prompt_ids + got, params)
            async for delta in stream:
                if moves:
                    delta = replace(delta, completion_tokens=None if delta.completion_tokens is None else
                                    offset + delta.completion_tokens)
                    if record is not None:
                        record["resumed_at"], record = time.time(), None
                got += delta.token_ids
                self._queue.put_nowait((choice.index, delta))
                if delta.finish_reason:
                    return
            self._queue.put_nowait((choice.index, RuntimeError("the stream ended without a finish_reason")))
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    async def _move(self, lost: Worker, choice: Choice, got: list[int], error: Exception) -> tuple[Worker, dict]:
        """Record the move, mark `lost` down (routing skips it for `down_for_s`) and pick another worker, waiting
        (bounded) while none is available; after `down_for_s` the lost one counts again if it answers (Serve restarted
        it). -> (the new worker, the move's record in `router.readmits`)."""
        log.warning("worker %r lost (%s): re-admitting %s after %d tokens", lost, error, choice.request_id, len(got))
        record = {"worker": repr(lost), "request_id": choice.request_id, "tokens": len(got), "lost_at": time.time(),
                  "resumed_at": None}
        self.router.readmits.append(record)
        self.router.mark_down(lost, self.readmit.down_for_s)
        deadline = time.monotonic() + self.readmit.timeout_s
        while True:
            try:
                return await self.router.pick(limit=False), record
            except OpenAIError:
                if time.monotonic() + self.readmit.retry_every_s >= deadline:
                    raise
            await asyncio.sleep(self.readmit.retry_every_s)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> dict:
        """OpenAI's usage; `prompt_tokens_details.cached_tokens` (when the workers say) counts each prompt once, with
        the most any of its choices found cached."""
        prompt = self.prompt_tokens
        out = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
               "total_tokens": prompt + self.completion_tokens}
        cached: dict[int, int] = {}
        for c in self.choices:
            if c.cached_tokens is not None:
                cached[c.prompt] = max(cached.get(c.prompt, 0), c.cached_tokens)
        if cached:
            out["prompt_tokens_details"] = {"cached_tokens": sum(cached.values())}
        return out


_BACKGROUND: set[asyncio.Task] = set()  # keeps fire-and-forget aborts alive until they finish


def _spawn(coro) -> None:
    task = asyncio.ensure_future(_quietly(coro))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception as e:
        log.warning("abort failed: %r", e)
