"""Logprobs as OpenAI returns them: the wire types (chat's `{"content": [...]}`, completions' legacy
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`), and `LogprobsBuffer`, which holds one choice's
token ids and logprobs (`TokenLogprobs` from the worker's deltas) until a stream chunk or the whole answer takes them.

Token strings come from `TextCodec.token_piece` (the one detokenizer). A logprob of -inf (a token a logits processor
ruled out) is sent as -9999.0, as vLLM does: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from moemesh.actors.request import TokenLogprobs

NEG_INF_LOGPROB = -9999.0
TokenPiece = Callable[[int], tuple[str, list[int]]]  # token id -> (its text alone, its bytes)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    """`choices[i].logprobs` of a chat answer or chunk."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(_Out):
    """`choices[i].logprobs` of a completion: per token its text, logprob (null for a prompt's first token), the
    most likely tokens there (text -> logprob, the token itself included; null for the first prompt token) and the
    offset of its text in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@dataclass(frozen=True)
class Entry:
    """One token: its id, logprob (None: a prompt's first token) and the most likely tokens at its position."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def entries(ids: Sequence[int], lp: TokenLogprobs | None) -> list[Entry]:
    """`ids` with their logprobs (none from a worker that sent none)."""
    if lp is None:
        return []
    return [Entry(t, v, list(zip(ti, tv))) for t, v, ti, tv in zip(ids, lp.logprobs, lp.top_ids, lp.top_logprobs)]


class LogprobsBuffer:
    """One choice's logprobs not yet sent; `style` is the endpoint's format."""

    def __init__(self, piece: TokenPiece, style: Literal["chat", "completion"]):
        self.piece, self.style = piece, style
        self._pending: list[Entry] = []
        self._offset = 0  # text_offset of the next completion token

    def add_prompt(self, prompt_ids: Sequence[int], lp: TokenLogprobs | None) -> None:
        """Prompt logprobs (echo): the first prompt token has none."""
        if lp is not None and prompt_ids:
            self._pending += [Entry(prompt_ids[0], None)] + entries(prompt_ids[1:], lp)

    def add(self, ids: Sequence[int], lp: TokenLogprobs | None) -> None:
        self._pending += entries(ids, lp)

    def take(self) -> ChatLogprobs | CompletionLogprobs | None:
        """What is pending, in the endpoint's format (None when nothing is)."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        return self._chat(pending) if self.style == "chat" else self._completion(pending)

    def _chat(self, pending: list[Entry]) -> ChatLogprobs:
        def top(token: int, logprob: float) -> dict:
            text, raw = self.piece(token)
            return {"token": text, "logprob": _finite(logprob), "bytes": raw}

        return ChatLogprobs(content=[ChatTokenLogprob(**top(e.token, e.logprob),
                                                      top_logprobs=[TopLogprob(**top(t, v)) for t, v in e.top])
                                     for e in pending])

    def _completion(self, pending: list[Entry]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in pending:
            text = self.piece(e.token)[0]
            out.tokens.append(text)
            out.text_offset.append(self._offset)
            self._offset += len(text)
            if e.logprob is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(e.logprob))
            top = {self.piece(t)[0]: _finite(v) for t, v in e.top}
            top.setdefault(text, _finite(e.logprob))  # the token itself is always there (OpenAI, vLLM)
            out.top_logprobs.append(top)
        return out


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NEG_INF_LOGPROB
