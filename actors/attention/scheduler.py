"""Continuous batching: which sequences run in the next model step, and with which tokens.

Plain bookkeeping over `Sequence`s and a `BlockManager`; no tensors. The engine loop is

    out = scheduler.schedule()          # chunks to feed; blocks for them are already allocated
    sampled = run the model on out      # {request_id: token} for every chunk with `sample`
    finished = scheduler.update(out, sampled)

Policy (docs/scheduling.md): running sequences first, oldest first, one chunk each (a decode token, or the next
replayed chunk after a preemption); when blocks run out, the most recently admitted running sequence is preempted
by recompute (its blocks freed, requeued at the front). Then, if nothing was preempted, waiting sequences are
admitted in FIFO order while slots, blocks (beyond a watermark) and the step's token budget allow.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from moemesh.actors.attention.blocks import BlockManager, OutOfBlocks
from moemesh.actors.attention.prefix_cache import CachedPrefix, PrefixCache
from moemesh.actors.attention.sequence import Sequence, SequenceStatus
from moemesh.actors.request import FinishReason


class SchedulerConfig(BaseModel):
    """Continuous-batching limits of one attention worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(8, ge=1, description="Most sequences running at once (= KV state slots).")
    max_num_batched_tokens: int | None = Field(
        2048, ge=1, description="Most tokens fed in one step (decode tokens + prefill chunks); None = no limit. The "
                                "first chunk of a step is always taken, so a long prompt is never starved.")
    chunked_prefill: bool = Field(
        True, description="Split prompts to fill the token budget, so a long prompt never stalls running decodes "
                          "for more than one budget's worth of tokens per step. Exact: chunked and whole prefill "
                          "give the same tokens (the CSA indexer breaks score ties by entry index, not pool size).")
    watermark: float = Field(0.01, ge=0, lt=1, description="Share of the blocks kept free when admitting while "
                                                           "others run, so running sequences can grow.")
    exact_recompute: bool = Field(
        True, description="After a preemption, feed the sequence's recorded chunks again (prompt, then one token per "
                          "step): bit-exact continuation. False: one prefill of prompt + generated tokens (fewer "
                          "steps; the same selections, float rounding may differ in the last bits).")


@dataclass
class ScheduledChunk:
    """One sequence's tokens in a step: `token_ids` start at position `start` of the sequence. `sample`: the chunk
    reaches the sequence's end, so the logits of its last token give the next token."""

    seq: Sequence
    start: int
    token_ids: list[int]
    sample: bool


@dataclass
class SchedulerOutput:
    """A step's plan. `chunks` in feed order; a chunk with `start == 0` needs a fresh cache. `preempted` lost their
    cache this step (drop it). `admitted` joined the running set this step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    prefix_hits: dict[str, tuple[CachedPrefix, list[tuple[int, int]]]] = field(default_factory=dict)
    # request_id -> (the cached prefix it starts from, block copies to make first): restore before the step

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    """FIFO admission, continuous batching and preemption by recompute over a `BlockManager`."""

    def __init__(self, blocks: BlockManager, config: SchedulerConfig | None = None,
                 prefix: PrefixCache | None = None):
        self.config = config or SchedulerConfig()
        if blocks.num_slots < self.config.max_num_seqs:
            raise ValueError(f"max_num_seqs: {self.config.max_num_seqs} exceeds the cache's {blocks.num_slots} "
                             "state slots")
        self.blocks, self.prefix = blocks, prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the first to be preempted
        self._requests: dict[str, Sequence] = {}
        self._watermark = math.ceil(self.config.watermark * blocks.num_blocks)
        self.num_preemptions = 0  # total, for metrics

    # -- requests -----------------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (ValueError as `check`)."""
        self.check(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._requests[seq.request_id] = seq

    def check(self, seq: Sequence) -> None:
        """ValueError if `seq`'s id is taken, or if it could never run to `max_tokens` even with the whole cache to
        itself (it would wait forever)."""
        if seq.request_id in self._requests:
            raise ValueError(f"request_id: {seq.request_id!r} is already in use")
        if not seq.prompt_token_ids:
            raise ValueError("prompt_token_ids: at least one token is needed")
        longest = seq.num_tokens + seq.max_tokens - 1  # the last sampled token is never fed
        need = self.blocks.blocks_needed(longest)
        if need > self.blocks.num_blocks:
            raise ValueError(f"request {seq.request_id!r}: {len(seq.prompt_token_ids)} prompt tokens + max_tokens "
                             f"{seq.max_tokens} need {need} KV blocks, the cache has {self.blocks.num_blocks} "
                             f"(at most {self.blocks.max_tokens(longest)} tokens fit one sequence)")

    def get(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    def finish(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """End a request now (a stop string, or "abort" when its client left): frees all it holds. None if unknown
        or already finished."""
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, reason)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        return self.finish(request_id, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step -----------------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Plan the next step and allocate its blocks. Empty when nothing waits or runs."""
        out = SchedulerOutput()
        budget = self._schedule_running(out)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput) -> float:
        budget = self.config.max_num_batched_tokens or math.inf
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            k = self._chunk_size(seq, budget, out)
            if k == 0:  # no budget left this step; it keeps its place
                i += 1
                continue
            while not self.blocks.can_allocate(seq.request_id, seq.num_computed + k):
                victim = self.running.pop()  # the most recently admitted; never one scheduled earlier this step
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self._take(seq, k, out)
            budget -= k
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: float) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.num_free_slots:
                break
            self.blocks.admit(seq.request_id)
            hit = self._start_from_prefix(seq)
            k = self._chunk_size(seq, budget, out)
            reserve = self._watermark if self.running else 0
            if hit is False or k == 0 or not self.blocks.can_allocate(seq.request_id, seq.num_computed + k, reserve):
                self.blocks.free(seq.request_id)
                seq.num_computed = seq.num_cached_tokens = 0
                break  # FIFO: nobody overtakes the head
            if hit:
                out.prefix_hits[seq.request_id] = hit
                seq.chunks.append(seq.num_computed)  # a recompute replays the cached part as one chunk
                seq.num_fed_chunks += 1
                self.prefix.queries += len(seq.prompt_token_ids)
                self.prefix.hits += seq.num_computed
            elif self.prefix is not None and seq.use_prefix_cache and not seq.replaying:
                self.prefix.queries += len(seq.prompt_token_ids)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            self._take(seq, k, out)
            budget -= k

    def _start_from_prefix(self, seq: Sequence):
        """For an admitted `seq` with nothing computed: adopt the longest cached prefix of its tokens -> (prefix,
        block copies), None when there is none to use, False when no block was left for the copies."""
        if self.prefix is None or not seq.use_prefix_cache or seq.replaying or seq.num_computed:
            return None
        entry = self.prefix.match(seq.token_ids)
        if entry is None:
            return None
        try:
            copies = self.prefix.adopt(seq.request_id, entry)
        except OutOfBlocks:
            return False
        seq.num_computed = seq.num_cached_tokens = entry.num_tokens
        return entry, copies

    def _chunk_size(self, seq: Sequence, budget: float, out: SchedulerOutput) -> int:
        """The chunk `seq` would feed now, or 0 if it does not fit the remaining token budget (the first chunk of a
        step always fits). With a prefix cache, a chunk crossing a prefix boundary ends at the last one it crosses,
        so the state there can be cached."""
        k = seq.next_chunk(None if math.isinf(budget) else int(budget), self.config.chunked_prefill)
        if self.prefix is not None and not seq.replaying and seq.use_prefix_cache:
            g, start = self.prefix.block_tokens, seq.num_computed
            aligned = (start + k) // g * g
            k = aligned - start if start < aligned < start + k else k
        return k if k <= budget or not out.chunks else 0

    def _take(self, seq: Sequence, k: int, out: SchedulerOutput) -> None:
        self.blocks.allocate(seq.request_id, seq.num_computed + k)
        start = seq.num_computed
        out.chunks.append(ScheduledChunk(seq, start, seq.tokens(start, start + k),
                                         sample=start + k == seq.num_tokens))

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        seq.reset_cache(keep_chunks=self.config.exact_recompute)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- results ------------------------------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: Mapping[str, int]) -> list[Sequence]:
        """Record a step's results: every chunk of `out` was fed; `sampled` holds the new token of each chunk with
        `sample`. Finishes (and frees) sequences that hit a stop token or their length limit -> those sequences.
        Chunks of sequences finished meanwhile (aborted during the step) are ignored."""
        finished = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.fed(len(chunk.token_ids))
            if not chunk.sample:
                continue
            token = int(sampled[seq.request_id])
            seq.output_token_ids.append(token)
            reason = ("stop" if token in seq.stop_token_ids else
                      "length" if len(seq.output_token_ids) >= seq.max_tokens else None)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if self.blocks.holds(seq.request_id):
            self.blocks.free(seq.request_id)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        del self._requests[seq.request_id]
