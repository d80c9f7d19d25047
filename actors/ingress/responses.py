"""The OpenAI-compatible response types of the ingress: answers, stream chunks, errors, model cards (re-exported by
protocol.py, beside the requests)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from moemesh.actors.ingress.logprobs import ChatLogprobs, CompletionLogprobs
from moemesh.actors.request import FinishReason

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Out):
    cached_tokens: int = Field(0, description="Prompt tokens whose state came from the prefix cache.")


class Usage(_Out):
    prompt_tokens: int = Field(description="Prompt tokens, counted once per prompt (not per choice).")
    completion_tokens: int = Field(description="Generated tokens over all choices.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(None, exclude_if=lambda v: v is None,
                                                              description="Absent when the workers do not say.")


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Out):
    """A /v1/completions answer, and (with `usage` absent or null) one of its stream chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]  # tool_calls: ended after tool calls


class FunctionCallOut(_Out):
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it.")


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is tool calls only.")
    tool_calls: list[ToolCallOut] | None = Field(None, description="Present only when the model called tools.")

    @model_serializer(mode="wrap")
    def _without_empty_tool_calls(self, handler):
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(_Out):
    index: int
    delta: dict[str, Any] = Field(description="{'role', 'content'} on the first chunk, then {'content'} and/or "
                                  "{'tool_calls'} (OpenAI's tool-call deltas), {} last.")
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    """The body of every 4xx/5xx answer, and of the last SSE event of a stream that failed."""

    error: ErrorInfo


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moemesh"
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
