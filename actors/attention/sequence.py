"""A request as the attention worker sees it: its parameters (`RequestParams`, validated at the edge) and its
progress (`Sequence`: tokens, how many are in the KV cache, the chunks they were fed in, status).

No tensors here: the scheduler works on these alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moemesh.kernels.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64


class RequestParams(BaseModel):
    """How one request generates. Defaults are greedy (as `DeepseekV4.generate`); the OpenAI front maps its own
    defaults explicitly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="Most new tokens to generate (the context may end it sooner).")
    temperature: float = Field(0.0, ge=0, description="Softmax temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set holding this mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of this request's own random generator, so its "
                                                                 "samples do not depend on the batch it runs in.")
    stop: list[str] = Field(default_factory=list, description=f"Stop as soon as the text contains one of these (at "
                            f"most {MAX_STOP_STRINGS}, each 1..{MAX_STOP_LENGTH} chars); the text excludes it.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end the request (besides "
                                      "the model's eos); their text is not returned.")
    ignore_eos: bool = Field(False, description="Keep generating past the model's eos token.")
    replay_chunks: list[int] = Field(default_factory=list, description="A request moved from a lost worker: the "
                                     "chunks its prompt tokens were fed in there (the original prompt, then one per "
                                     "generated token); fed the same way here so the continuation is exact. Empty: "
                                     "a new request.")

    @field_validator("replay_chunks")
    @classmethod
    def _positive_chunks(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"replay_chunks: every chunk needs 1 or more tokens, got {v[:8]}")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
        for s in v:
            if not 1 <= len(s) <= MAX_STOP_LENGTH:
                shown = s if len(s) <= 40 else s[:40] + "..."
                raise ValueError(f"each stop string needs 1..{MAX_STOP_LENGTH} chars, got {len(s)}: {shown!r}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _bounded_stop_ids(cls, v: list[int]) -> list[int]:
        if len(v) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(v)}")
        bad = [t for t in v if t < 0]
        if bad:
            raise ValueError(f"token ids are >= 0, got {bad}")
        return v

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress.

    `chunks` records how the tokens were fed (prompt, or its prefill chunks, then one token per step). After a
    preemption the cache is rebuilt by feeding the same chunks again: the CSA indexer's top-k breaks exact score ties
    depending on how many entries the pool holds when a query runs, so only the same chunking gives the same state.
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
