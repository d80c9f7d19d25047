"""The shapes of answers and stream chunks: `CompletionFormat` (/v1/completions) and `ChatFormat`
(/v1/chat/completions) turn a request's `Choice`s (their text and logprobs) into OpenAI's JSON."""

from __future__ import annotations

import time
import uuid

from moemesh.actors.ingress.generation import Choice
from moemesh.actors.ingress.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    FinishReason,
    Usage,
)


def _take_logprobs(choice: Choice):
    return choice.logprobs.take() if choice.logprobs is not None else None


class CompletionFormat:
    """/v1/completions answers and stream chunks (object "text_completion"); each chunk carries the logprobs of the
    tokens that arrived since the one before."""

    prefix = "cmpl"

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model, self.include_usage = model, include_usage

    def _head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def opening(self, choices: list[Choice]) -> list[dict]:
        return []

    def chunk(self, choice: Choice, text: str) -> dict | None:
        logprobs = _take_logprobs(choice)
        if not text and logprobs is None and choice.finish_reason is None:
            return None
        out = CompletionResponse(**self._head(), choices=[
            CompletionChoice(index=choice.index, text=text, logprobs=logprobs, finish_reason=choice.finish_reason)])
        return out.model_dump(exclude=None if self.include_usage else {"usage"})

    def usage_chunk(self, usage: dict) -> dict:
        return CompletionResponse(**self._head(), choices=[], usage=Usage(**usage)).model_dump()

    def response(self, choices: list[Choice], texts: dict[int, str], usage: dict) -> dict:
        return CompletionResponse(**self._head(), usage=Usage(**usage), choices=[
            CompletionChoice(index=c.index, text=texts[c.index], logprobs=_take_logprobs(c),
                             finish_reason=c.finish_reason) for c in choices
        ]).model_dump()


class ChatFormat(CompletionFormat):
    """/v1/chat/completions answers (object "chat.completion") and chunks ("chat.completion.chunk"): the first chunk
    of each choice carries the role, the last one the finish_reason (with an empty delta if no text is left)."""

    prefix = "chatcmpl"

    def opening(self, choices: list[Choice]) -> list[dict]:
        return [self._chunk(c.index, {"role": "assistant", "content": ""}, None, None) for c in choices]

    def chunk(self, choice: Choice, text: str) -> dict | None:
        logprobs = _take_logprobs(choice)
        if not text and logprobs is None and choice.finish_reason is None:
            return None
        return self._chunk(choice.index, {"content": text} if text else {}, logprobs, choice.finish_reason)

    def _chunk(self, index: int, delta: dict, logprobs, finish_reason: FinishReason | None) -> dict:
        out = ChatCompletionChunk(**self._head(), choices=[
            ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])
        return out.model_dump(exclude=None if self.include_usage else {"usage"})

    def usage_chunk(self, usage: dict) -> dict:
        return ChatCompletionChunk(**self._head(), choices=[], usage=Usage(**usage)).model_dump()

    def response(self, choices: list[Choice], texts: dict[int, str], usage: dict) -> dict:
        return ChatCompletionResponse(**self._head(), usage=Usage(**usage), choices=[
            ChatChoice(index=c.index, message=ChatMessageOut(content=texts[c.index]), logprobs=_take_logprobs(c),
                       finish_reason=c.finish_reason) for c in choices]).model_dump()
