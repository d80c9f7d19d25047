"""A request from the HTTP edge to the sampler: one parameters type (`RequestParams`, built by the ingress, carried to
the attention worker, turned into `SamplingParams` there), what a worker streams back (`Delta`: token ids and, when
asked, their logprobs as `TokenLogprobs`; the ingress is the one place that detokenizes), and the one check of token
ids against a vocabulary.

No tensors and no I/O: the ingress (actors/ingress/) and the attention worker (actors/attention/) both import this.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moemesh.kernels.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # most alternatives per position (OpenAI's chat top_logprobs limit; vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 1024  # most entries of logit_bias


class ToolSpec(BaseModel):
    """A function the model may call: its name and its parameters' JSON schema (JSON text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, description="The function's name.")
    parameters: str = Field('{"type": "object"}', description="JSON schema of its arguments, as JSON text.")


class StructuredOutput(BaseModel):
    """What the output must be, enforced while decoding by a grammar (actors/attention/grammar.py). Plain data (it
    crosses processes); the worker compiles it and caches the compiled grammar keyed by this value.

    - `json_object`: any JSON object.
    - `json_schema`: a JSON value valid against `json_schema` (JSON text; the ingress checked which keywords it uses).
    - `tool_calls`: DeepSeek-V4 tool-call markup calling one of `tools` (one call, or one or more with `parallel`),
      arguments valid against that tool's parameters (`tool_choice` "required" or a named function)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["json_object", "json_schema", "tool_calls"]
    json_schema: str | None = Field(None, description="json_schema: the schema, as JSON text.")
    tools: tuple[ToolSpec, ...] = Field((), description="tool_calls: the functions that may be called.")
    parallel: bool = Field(True, description="tool_calls: more than one call allowed.")


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
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Return each generated token's logprob "
                                 "and this many most likely alternatives at its position; None = off.")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="The same for every prompt token "
                                        "but the first (computed in prefill); None = off.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from the logit of every token that "
                                    "occurs in the output so far.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Times the token's count in the output so far, "
                                     "subtracted from its logit.")
    repetition_penalty: float = Field(1.0, gt=0, description="Tokens seen in the prompt or the output: a positive "
                                      "logit is divided by it, a negative one multiplied; 1 = off.")
    logit_bias: dict[int, float] = Field(default_factory=dict, description=f"Token id -> added to its logit, in "
                                         f"[-100, 100]; at most {MAX_LOGIT_BIAS} entries.")
    structured: StructuredOutput | None = Field(None, description="A grammar the output must follow (JSON mode, "
                                                "a JSON schema, forced tool calls); None = free text.")
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

    @field_validator("logit_bias")
    @classmethod
    def _bounded_bias(cls, v: dict[int, float]) -> dict[int, float]:
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
        bad = {t: b for t, b in v.items() if t < 0 or not -100 <= b <= 100}
        if bad:
            raise ValueError(f"token ids are >= 0 and biases in [-100, 100], got {dict(list(bad.items())[:5])}")
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


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of a run of tokens, one entry per token: its own logprob, and the ids and logprobs of the most likely
    tokens at its position (largest first; as many as asked for, possibly none). Plain lists: it crosses processes."""

    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.logprobs)

    def __add__(self, other: TokenLogprobs) -> TokenLogprobs:
        return TokenLogprobs(self.logprobs + other.logprobs, self.top_ids + other.top_ids,
                             self.top_logprobs + other.top_logprobs)


@dataclass(frozen=True)
class Delta:
    """What a worker streams for one sequence: its new token ids since the last delta. Text is the ingress's job
    (stop strings included: it cuts there and aborts the sequence). `finish_reason` is set on the last delta and only
    there ("stop" from a worker: a stop token, eos or one of `stop_token_ids`, ended the sequence). `completion_tokens`:
    the cumulative count as the worker sees it; when given it is what `usage` reports, otherwise the ingress counts the
    ids it received. `prompt_tokens` is informational: the ingress always reports the prompt it tokenized (a worker that
    re-prefilled after a failover sees more). `logprobs`: of `token_ids`, when the request asked (`RequestParams.
    logprobs`); `prompt_logprobs`: on the first delta, of prompt tokens 1.. (the first has none). `cached_tokens`: prompt
    tokens whose state the worker took from its prefix cache (None: the worker does not say). `asdict(delta)` and
    `Delta(**that)` round-trip (what crosses a process boundary)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None
    cached_tokens: int | None = None

    def __post_init__(self):
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, TokenLogprobs(**value))


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> list[int]:
    """`ids` as a list of ints, or ValueError naming `param` and the first bad ids when one is not an integer in
    [0, vocab_size). The one token-id check: the ingress (HTTP 400) and the engine (a request from any other client)
    both call it."""
    out, bad = [], []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            bad.append(t)
        else:
            out.append(t)
    if bad:
        raise ValueError(f"{param}: token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
    return out
