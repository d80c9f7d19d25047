"""The shapes of answers and stream chunks: `CompletionFormat` (/v1/completions) and `ChatFormat`
(/v1/chat/completions) turn a request's `Choice`s (their text and logprobs) into OpenAI's JSON."""

from __future__ import annotations

import time
import uuid

from moemesh.actors.ingress.generation import Choice
from moemesh.actors.ingress.protocol import (
    ChatCompletionRequest,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    ToolCallOut,
    Usage,
)
from moemesh.actors.ingress.tool_parser import ToolCallParser, parse_tool_calls
from moemesh.actors.ingress.tools import ToolPlan, tool_plan


def _take_logprobs(choice: Choice):
    return choice.logprobs.take() if choice.logprobs is not None else None


class CompletionFormat:
    """/v1/completions answers and stream chunks (object "text_completion"); each chunk carries the logprobs of the
    tokens that arrived since the one before."""

    prefix = "cmpl"
    tools = ToolPlan()  # no tools on /v1/completions

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model, self.include_usage = model, include_usage

    @classmethod
    def for_request(cls, model: str, req: CompletionRequest | ChatCompletionRequest) -> CompletionFormat:
        return cls(model, req.include_usage)

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
    of each choice carries the role, the last one the finish_reason (with an empty delta if no text is left). With
    tools, each choice's text goes through a `ToolCallParser`: tool-call markup becomes `tool_calls` (deltas when
    streamed), never content, and a choice that stopped after calls finishes with "tool_calls"."""

    prefix = "chatcmpl"

    def __init__(self, model: str, include_usage: bool, tools: ToolPlan | None = None):
        super().__init__(model, include_usage)
        self.tools = tools or ToolPlan()
        self._parsers: dict[int, ToolCallParser] = {}

    @classmethod
    def for_request(cls, model: str, req: ChatCompletionRequest) -> ChatFormat:
        return cls(model, req.include_usage, tool_plan(req))

    def opening(self, choices: list[Choice]) -> list[dict]:
        return [self._chunk(c.index, {"role": "assistant", "content": ""}, None, None) for c in choices]

    def chunk(self, choice: Choice, text: str) -> dict | None:
        logprobs = _take_logprobs(choice)
        calls = []
        if self.tools.names:
            parser = self._parsers.setdefault(choice.index, ToolCallParser(self.tools.names, self.tools.max_calls))
            text, calls = parser.feed(text, final=choice.finish_reason is not None)
        if not text and not calls and logprobs is None and choice.finish_reason is None:
            return None
        delta = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
        called = choice.index in self._parsers and bool(self._parsers[choice.index].shown_calls)
        return self._chunk(choice.index, delta, logprobs, _finish_reason(choice.finish_reason, called))

    def _chunk(self, index: int, delta: dict, logprobs, finish_reason: FinishReason | None) -> dict:
        out = ChatCompletionChunk(**self._head(), choices=[
            ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])
        return out.model_dump(exclude=None if self.include_usage else {"usage"})

    def usage_chunk(self, usage: dict) -> dict:
        return ChatCompletionChunk(**self._head(), choices=[], usage=Usage(**usage)).model_dump()

    def response(self, choices: list[Choice], texts: dict[int, str], usage: dict) -> dict:
        return ChatCompletionResponse(**self._head(), usage=Usage(**usage), choices=[
            self._choice(c, texts[c.index]) for c in choices]).model_dump()

    def _choice(self, choice: Choice, text: str) -> ChatChoice:
        calls = []
        if self.tools.names:
            text, calls = parse_tool_calls(text, self.tools.names, self.tools.max_calls)
        message = ChatMessageOut(content=text if text or not calls else None,
                                 tool_calls=[ToolCallOut(**c.openai()) for c in calls] or None)
        return ChatChoice(index=choice.index, message=message, logprobs=_take_logprobs(choice),
                          finish_reason=_finish_reason(choice.finish_reason, bool(calls)))


def _finish_reason(reason: FinishReason | None, called: bool):
    """A choice that stopped by itself after tool calls finishes with "tool_calls" (a cut one keeps "length")."""
    return "tool_calls" if reason == "stop" and called else reason
