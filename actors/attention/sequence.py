"""A request as the attention worker sees it: its parameters (`RequestParams`, actors/request.py) and its
progress (`Sequence`: tokens, how many are in the KV cache, the chunks they were fed in, status).

No tensors here: the scheduler works on these alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moemesh.actors.request import FinishReason


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress.

    `chunks` records how the tokens were fed (prompt, or its prefill chunks, then one token per step). After a
    preemption the cache is rebuilt by feeding the same chunks again: other chunkings select the same indexer
    entries (ties go to the lower index), but float sums of differently shaped steps may differ in the last bits.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int  # completion limit
    stop_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose state is in the cache
    chunks: list[int] = field(default_factory=list)  # lengths of the chunks fed, in order (kept across preemption)
    num_fed_chunks: int = 0  # how many of `chunks` the current cache has seen
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    use_prefix_cache: bool = True  # False: compute every prompt token (e.g. prompt logprobs need each position)
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache at (the last) admission

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """`token_ids[start:end]` without concatenating the whole sequence (a decode step asks for one token)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - n)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def replaying(self) -> bool:
        return self.num_fed_chunks < len(self.chunks)

    def next_chunk(self, budget: int | None, chunked: bool) -> int:
        """Tokens to feed next: the recorded chunk when replaying, else everything not yet computed (capped by the
        step's token `budget` when prefill is chunked)."""
        if self.replaying:
            return self.chunks[self.num_fed_chunks]
        remaining = self.num_tokens - self.num_computed
        return min(remaining, budget) if chunked and budget is not None else remaining

    def fed(self, k: int) -> None:
        """`k` more tokens are in the cache."""
        if self.replaying:
            assert self.chunks[self.num_fed_chunks] == k, "replay must feed the recorded chunk"
        else:
            self.chunks.append(k)
        self.num_fed_chunks += 1
        self.num_computed += k

    def reset_cache(self, keep_chunks: bool) -> None:
        """The cache is gone (preemption): recompute from scratch, in the recorded chunks if `keep_chunks`."""
        self.num_computed, self.num_fed_chunks = 0, 0
        if not keep_chunks:
            self.chunks = []
