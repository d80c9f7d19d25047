"""An in-process serving engine: model + paged KV cache + continuous-batching scheduler + sampler, no Ray, no gRPC.

`Engine.step()` reads as three calls: schedule, run, postprocess. The forward pass is one pluggable function,
`model_step(token_ids, caches) -> hidden [N, D]` (default `model.step`), so the distributed attention worker can
substitute a step that sends MoE input to remote expert shards. `AsyncEngine` puts the step loop in a background
task (the model step itself in a worker thread) behind `async for out in generate(...)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

from moemesh.actors.attention.blocks import CacheLayout
from moemesh.actors.attention.grammar import GrammarCompiler, GrammarState
from moemesh.actors.attention.paged_cache import KVCacheUsage, PagedKVCache
from moemesh.actors.attention.prefix_cache import PrefixCache
from moemesh.actors.attention.sampler import LogitsProcessor, Sampled, SampleRow, prompt_logprobs, sample_rows
from moemesh.actors.attention.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from moemesh.actors.attention.sequence import Sequence
from moemesh.actors.request import Delta, FinishReason, RequestParams, TokenLogprobs, check_token_ids
from moemesh.kernels.decode_state import SequenceCache
from moemesh.kernels.model import DeepseekV4
from moemesh.kernels.sampling import SamplingParams

ModelStep = Callable[[Seq[Seq[int]], Seq[SequenceCache]], torch.Tensor]
PROMPT_LOGITS_ROWS = 512  # prompt positions turned into logits at once for prompt logprobs ([rows, V] float32)


class CacheConfig(BaseModel):
    """The paged KV cache of one engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(16, ge=1, description="Rows of head_dim per block (narrower rows pack more per block).")
    num_blocks: int | None = Field(None, ge=0, description="Blocks in the pool; give this or memory_bytes.")
    memory_bytes: int | None = Field(None, gt=0, description="Bytes for state slots + blocks (blocks get the rest).")
    enable_prefix_caching: bool = Field(True, description="Reuse the state of prompt prefixes computed before "
                                                          "(actors/attention/prefix_cache.py).")
    prefix_block_tokens: int = Field(64, ge=1, description="Prefix caching granularity: a state is cached after "
                                                           "every multiple of this many tokens.")
    prefix_snapshots: int | None = Field(None, ge=1, description="Cached prefix states (each one state slot of "
                                                                 "memory, beside the pool); None = 4 x max_num_seqs.")


@dataclass
class RequestOutput:
    """What one step produced for one request: its new token(s) and, on its last output, why it finished. Token ids
    only: text (and stop strings) are the ingress's (actors/ingress/), the one place that detokenizes. `logprobs` of
    the new tokens and (on the first output) `prompt_logprobs`, when the request asked."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None
    cached_tokens: int = 0  # prompt tokens whose state came from the prefix cache

    def delta(self) -> Delta:
        """What a worker streams to the ingress for this output."""
        return Delta(self.new_token_ids, self.finish_reason, self.prompt_tokens, self.completion_tokens,
                     self.logprobs, self.prompt_logprobs, self.cached_tokens)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache: KVCacheUsage
    num_preemptions: int  # since the engine started
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since the engine started
    prefix_cache_hits: int = 0  # of those, tokens found


@dataclass
class StepClock:
    """Cumulative seconds of `Engine.step` (what the step costs beyond the forward pass is the scheduling part:
    schedule, sampling, postprocess)."""

    steps: int = 0  # steps that ran the model
    total_s: float = 0.0
    model_s: float = 0.0  # inside `model_step`

    @property
    def scheduling_s(self) -> float:
        return max(self.total_s - self.model_s, 0.0)


@dataclass
class _Request:
    seq: Sequence
    params: RequestParams
    sampling: SamplingParams
    generator: torch.Generator | None
    cache: SequenceCache | None = None
    processors: list[LogitsProcessor] = field(default_factory=list)
    grammar: GrammarState | None = None
    prompt_lp: TokenLogprobs | None = None  # prompt logprobs so far (positions 0.. predict tokens 1..), if asked
    prompt_lp_sent: bool = False

    @property
    def num_prompt(self) -> int:
        """The request's own prompt: a moved request's prompt ends with tokens it generated elsewhere (their first
        replay chunk is the original prompt), which the penalties count as output."""
        return self.params.replay_chunks[0] if self.params.replay_chunks else len(self.seq.prompt_token_ids)

    def row(self) -> SampleRow:
        seq, n = self.seq, self.num_prompt
        if n == len(seq.prompt_token_ids):  # no copies: a request without penalties pays nothing here
            prompt, output = seq.prompt_token_ids, seq.output_token_ids
        else:
            prompt, output = seq.prompt_token_ids[:n], seq.prompt_token_ids[n:] + seq.output_token_ids
        return SampleRow(self.params, self.sampling, self.generator, prompt, output, self.processors, self.grammar,
                         sorted(self.seq.stop_token_ids) if self.grammar else ())


class Engine:
    """Continuous-batching generation on one model, in this process.

    add_request() queues; each step() runs one model step over every running sequence (new ones join at the next
    step) and returns one `RequestOutput` per request that got a token; finished requests free their KV memory."""

    def __init__(self, model: DeepseekV4, cache: CacheConfig | None = None,
                 scheduler: SchedulerConfig | None = None, model_step: ModelStep | None = None,
                 max_model_len: int | None = None, grammar: GrammarCompiler | None = None):
        """`grammar`: compiles requests' `structured` output (needs the tokenizer); None: such requests are refused."""
        cfg = model.config
        self.grammar = grammar
        self.model = model
        self.model_step: ModelStep = model_step or model.step
        self.max_model_len = min(cfg.max_position_embeddings, max_model_len or cfg.max_position_embeddings)
        scheduler = scheduler or SchedulerConfig()
        cache = cache or CacheConfig()
        num_blocks, memory = cache.num_blocks, cache.memory_bytes
        if num_blocks is None and memory is None:  # enough for every slot at full context
            per_seq = CacheLayout.from_config(cfg, cache.block_size).blocks_needed(self.max_model_len)
            num_blocks = scheduler.max_num_seqs * per_seq
        snapshots = (cache.prefix_snapshots or 4 * scheduler.max_num_seqs) if cache.enable_prefix_caching else 0
        self.kv = PagedKVCache(cfg, num_blocks=num_blocks, memory_bytes=memory, block_size=cache.block_size,
                               max_num_seqs=scheduler.max_num_seqs, dtype=model.dtype, device=model.device,
                               num_snapshots=snapshots)
        self.prefix = PrefixCache(self.kv.manager, cache.prefix_block_tokens, snapshots) if snapshots else None
        self.scheduler = Scheduler(self.kv.manager, scheduler, self.prefix)
        eos = cfg.eos_token_id
        self._eos = frozenset([eos] if isinstance(eos, int) else eos or [])
        self._requests: dict[str, _Request] = {}
        self.clock = StepClock()

    # -- requests -----------------------------------------------------------------------------------------------------
    def check_request(self, request_id: str, prompt_token_ids: Seq[int], params: RequestParams) -> Sequence:
        """Validate a request without queueing it (ValueError naming the field and value) -> its `Sequence`."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: a non-empty string is needed, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        V = self.model.config.vocab_size
        prompt = check_token_ids(prompt_token_ids, V, "prompt_token_ids")
        if not prompt:
            raise ValueError("prompt_token_ids: need 1 or more token ids, got none")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceed "
                             f"the context of {self.max_model_len} tokens")
        check_token_ids(params.stop_token_ids, V, "stop_token_ids")
        check_token_ids(params.logit_bias, V, "logit_bias")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)
        seq = Sequence(request_id, prompt, params.max_tokens, stop_ids)
        if params.replay_chunks:
            if sum(params.replay_chunks) != len(prompt):
                raise ValueError(f"replay_chunks: they sum to {sum(params.replay_chunks)} tokens, the prompt has "
                                 f"{len(prompt)}")
            seq.chunks = list(params.replay_chunks)  # fed as recorded, like a preempted sequence's recompute
        self.scheduler.check(seq)
        if params.structured is not None:
            if self.grammar is None:
                raise ValueError("response_format: structured output needs a grammar compiler (this engine has none)")
            self.grammar.compile(params.structured)  # a bad grammar fails here, before queueing; then cached
        return seq

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: RequestParams | None = None,
                    processors: Seq[LogitsProcessor] = ()) -> None:
        """Queue a request; it joins the running batch at a coming step. ValueError for a bad request. `processors`
        adjust its logits before each sample (see `LogitsProcessor`)."""
        params = params or RequestParams()
        seq = self.check_request(request_id, prompt_token_ids, params)
        seq.use_prefix_cache = params.prompt_logprobs is None  # prompt logprobs need every position computed
        self.scheduler.add(seq)
        sampling = params.sampling()
        self._requests[request_id] = _Request(seq, params, sampling, sampling.generator(self.model.device),
                                              processors=list(processors),
                                              grammar=self.grammar.state(params.structured) if params.structured
                                              else None)
        if params.prompt_logprobs is not None:
            self._requests[request_id].prompt_lp = TokenLogprobs()

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its memory -> its last output (finish_reason "abort"); None if unknown."""
        if self.scheduler.abort(request_id) is None:
            return None
        return self._output(self._requests.pop(request_id), [])

    def abort_all(self) -> list[RequestOutput]:
        return [out for rid in list(self._requests) if (out := self.abort(rid)) is not None]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        s = self.scheduler
        p = self.prefix
        return EngineStats(len(s.running), len(s.waiting), self.kv.usage(), s.num_preemptions,
                           p.queries if p else 0, p.hits if p else 0)

    # -- the step -----------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One model step over the scheduled batch -> an output per request that got a new token."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            self._requests[seq.request_id].cache = None  # its blocks are already free
        if not plan.chunks:
            return []
        sampled = self._run(plan)
        self._remember_prefixes(plan)
        outputs = self._postprocess(plan, sampled)
        self.clock.steps += 1
        self.clock.total_s += time.perf_counter() - started
        return outputs

    def _run(self, plan: SchedulerOutput) -> dict[str, Sampled]:
        """Feed the chunks, sample the sequences that reached their end -> {request_id: sampled}."""
        caches = []
        for chunk in plan.chunks:
            req = self._requests[chunk.seq.request_id]
            if chunk.start == 0 or req.cache is None:
                req.cache = self.kv.new_sequence(chunk.seq.request_id)
            if chunk.seq.request_id in plan.prefix_hits:
                self.kv.restore(req.cache, *plan.prefix_hits[chunk.seq.request_id])
            caches.append(req.cache)
        started = time.perf_counter()
        hidden = self.model_step([c.token_ids for c in plan.chunks], caches)  # [N, D]
        self.clock.model_s += time.perf_counter() - started
        ends = torch.tensor([len(c.token_ids) for c in plan.chunks]).cumsum(0) - 1
        self._prompt_logprobs(plan, hidden, ends.tolist())
        rows = [int(e) for c, e in zip(plan.chunks, ends) if c.sample]
        if not rows:
            return {}
        logits = self.model.logits(hidden[torch.tensor(rows, device=hidden.device)])  # [n, V]
        rids = [c.seq.request_id for c in plan.chunks if c.sample]
        return dict(zip(rids, sample_rows(logits, [self._requests[rid].row() for rid in rids])))

    def _prompt_logprobs(self, plan: SchedulerOutput, hidden: torch.Tensor, ends: list[int]) -> None:
        """For requests that asked: the logprobs of the prompt tokens that this step's chunks predict (position p
        predicts token p + 1). Positions already done (before a preemption) are not done again."""
        for chunk, end in zip(plan.chunks, ends):
            req = self._requests[chunk.seq.request_id]
            k, got = req.params.prompt_logprobs, req.prompt_lp
            if got is None:
                continue
            first, last = max(chunk.start, len(got)), min(chunk.start + len(chunk.token_ids), req.num_prompt - 1)
            base = end + 1 - len(chunk.token_ids) - chunk.start  # hidden row of position 0
            for p in range(first, last, PROMPT_LOGITS_ROWS):
                q = min(p + PROMPT_LOGITS_ROWS, last)
                logits = self.model.logits(hidden[base + p:base + q])  # [q - p, V]
                got = got + prompt_logprobs(logits, req.seq.prompt_token_ids[p + 1:q + 1], k)
            req.prompt_lp = got

    def _remember_prefixes(self, plan: SchedulerOutput) -> None:
        """Cache the state of every sequence whose chunk ended on a prefix boundary (before finished ones free it)."""
        if self.prefix is None:
            return
        for chunk in plan.chunks:
            seq, end = chunk.seq, chunk.start + len(chunk.token_ids)
            if end % self.prefix.block_tokens or not seq.use_prefix_cache or seq.finish_reason is not None:
                continue
            entry = self.prefix.register(seq.tokens(0, end), seq.request_id)
            if entry is not None:
                self.kv.save_snapshot(self._requests[seq.request_id].cache, entry.snapshot)

    def _postprocess(self, plan: SchedulerOutput, sampled: dict[str, Sampled]) -> list[RequestOutput]:
        self.scheduler.update(plan, {rid: s.token for rid, s in sampled.items()})
        outputs = []
        for chunk in plan.chunks:
            rid = chunk.seq.request_id
            if rid not in sampled or rid not in self._requests:
                continue
            req, s = self._requests[rid], sampled[rid]
            if req.seq.finish_reason is not None:
                del self._requests[rid]
            outputs.append(self._output(req, [s.token], s.logprobs))
        return outputs

    @staticmethod
    def _output(req: _Request, tokens: list[int], logprobs: TokenLogprobs | None = None) -> RequestOutput:
        seq = req.seq
        prompt_lp = None if req.prompt_lp_sent else req.prompt_lp  # with the first output only
        req.prompt_lp_sent = True
        return RequestOutput(seq.request_id, tokens, seq.finish_reason, len(seq.prompt_token_ids),
                             len(seq.output_token_ids), logprobs, prompt_lp, seq.num_cached_tokens)


class AsyncEngine:
    """asyncio front of an `Engine`: `generate` streams a request's outputs while a background task runs the step
    loop (each model step in a worker thread, so the event loop stays responsive).

    Requests and aborts arriving while a step runs are applied between steps (the engine is touched by one thread at
    a time). A consumer that stops iterating (client disconnect, cancellation, `break`) aborts its request, which
    frees its KV memory."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: list[tuple[str, object]] = []  # ("add", (rid, seq, params)) | ("abort", rid)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def generate(self, request_id: str, prompt_token_ids: Seq[int],
                       params: RequestParams | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs, the last with its finish_reason. ValueError (on first iteration) for a bad
        request."""
        params = params or RequestParams()
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        self.engine.check_request(request_id, prompt_token_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._submit(("add", (request_id, list(prompt_token_ids), params)))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(("abort", request_id))

    def abort(self, request_id: str) -> None:
        """End a request; its stream gets a last output with finish_reason "abort"."""
        self._submit(("abort", request_id))

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- the loop -----------------------------------------------------------------------------------------------------
    def _submit(self, item: tuple[str, object]) -> None:
        self._pending.append(item)
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._pending:
                    await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # the model failed: every request in flight gets the error, memory is freed
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for kind, arg in pending:
            if kind == "add":
                rid, prompt, params = arg
                if rid not in self._streams:  # its consumer already left
                    continue
                try:
                    self.engine.add_request(rid, prompt, params)
                except ValueError as e:
                    self._deliver(rid, e)
            else:
                out = self.engine.abort(arg)
                if out is not None:
                    self._deliver(arg, out)

    def _deliver(self, request_id: str, item) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _fail_all(self, error: Exception) -> None:
        for out in self.engine.abort_all():
            self._deliver(out.request_id, RuntimeError(f"engine step failed: {error!r}"))
