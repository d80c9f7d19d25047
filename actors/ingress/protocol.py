"""The OpenAI-compatible wire types of the ingress: limits, requests, responses and errors.

Requests are validated in strict mode (`"5"` is not an int, `1.0` is not an int, `"true"` is not a bool) after the
ingress parsed the body itself (see `parse_json_body`). Unknown request fields are accepted and ignored
(`extra="ignore"`): OpenAI clients send fields we do not model (`user`, `metadata`, `store`, ...) and must keep
working. Fields we model but cannot honour (`suffix`, ...) are rejected with 400 when set to
a non-default value, so a client never gets silently different behaviour from what it asked for.
Every error, whatever raised it, becomes an `OpenAIError` in one place: `to_openai_error`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from moemesh.actors.request import MAX_LOGIT_BIAS, MAX_LOGPROBS, FinishReason

SEED_RANGE = (0, 2**63 - 1)  # what torch generators and the engine accept


# ---- limits --------------------------------------------------------------------------------------------------------
class IngressLimits(BaseModel):
    """What one request may ask for. Defaults are safe for a public endpoint; raise them in the deployment config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_body_bytes: int = Field(2 * 1024 * 1024, gt=0, description="Largest request body (413 above).")
    context_length: int | None = Field(None, gt=1, description="Prompt + completion tokens; None: the model's "
                                       "max_position_embeddings.")
    max_prompt_tokens: int | None = Field(None, gt=0, description="Longest prompt; None: context_length - 1.")
    max_tokens: int = Field(4096, gt=0, description="Largest max_tokens a request may ask for.")
    default_completion_tokens: int = Field(16, gt=0, description="max_tokens of /v1/completions when absent "
                                           "(OpenAI's default); chat defaults to what the context leaves.")
    max_n: int = Field(8, gt=0, description="Largest n (choices per prompt).")
    max_prompts: int = Field(16, gt=0, description="Most prompts in one /v1/completions batch.")
    max_stop: int = Field(4, ge=0, description="Most stop strings.")
    max_stop_length: int = Field(256, gt=0, description="Longest stop string, in characters.")
    max_stop_token_ids: int = Field(64, ge=0, description="Most stop_token_ids.")
    stream_idle_timeout_s: float = Field(300.0, gt=0, description="Longest wait for a worker's next delta before "
                                         "the request fails (no hung streams).")
    load_timeout_s: float = Field(2.0, gt=0, description="Longest wait for a worker's load() while routing; a "
                                  "worker that does not answer is skipped.")
    max_in_flight: int = Field(256, gt=0, description="Generation requests the ingress runs at once; one more gets "
                               "429 with Retry-After instead of waiting in an unbounded queue.")
    max_concurrent_per_key: int = Field(64, gt=0, description="Generation requests one API key may have in flight "
                                        "(429 above); applies when API keys are configured.")
    max_worker_load: float | None = Field(None, gt=0, description="429 when every attention worker's load (running "
                                          "+ waiting sequences) is at least this; None: no such check (the cluster "
                                          "builder sets 2 x attention.max_num_seqs).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After header of a 429, in seconds.")


# ---- errors --------------------------------------------------------------------------------------------------------
class OpenAIError(Exception):
    """An error as OpenAI's API reports it: HTTP status + `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # extra response headers (Retry-After, WWW-Authenticate)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unavailable(message: str, code: str = "service_unavailable") -> OpenAIError:
    return OpenAIError(503, message, type="service_unavailable_error", code=code)


def unauthorized(message: str, code: str = "invalid_api_key") -> OpenAIError:
    """401 as OpenAI answers it; `message` must never hold the key that was presented."""
    return OpenAIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def too_many_requests(message: str, retry_after_s: int, code: str = "rate_limit_exceeded") -> OpenAIError:
    """429 with `Retry-After`: back-pressure instead of an unbounded queue."""
    return OpenAIError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": str(retry_after_s)})


class WorkerError(Exception):
    """A worker failed a request (raised from its stream, or it went silent); `__cause__` holds what it raised."""


def to_openai_error(exc: BaseException) -> OpenAIError:
    """The one place that maps exceptions to HTTP errors."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ValidationError):
        return _validation_error(exc)
    if isinstance(exc, WorkerError):
        cause = exc.__cause__
        if isinstance(cause, ValueError):  # the worker refused the request's parameters
            return bad_request(f"rejected by the worker: {cause}")
        if isinstance(cause, TimeoutError):
            return unavailable(f"the worker did not answer: {exc}", code="worker_timeout")
        return unavailable(f"the worker failed: {type(cause).__name__ if cause else 'error'}: {cause or exc}",
                           code="worker_error")
    return OpenAIError(500, f"internal error: {type(exc).__name__}", type="internal_error", code="internal_error")


def _validation_error(exc: ValidationError) -> OpenAIError:
    first = exc.errors(include_url=False)[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or None
    got = "" if first["type"] == "missing" else f", got {_short(first.get('input'))}"
    message = first["msg"].removeprefix("Value error, ")
    return bad_request(f"{param}: {message}{got}" if param else message + got, param=param,
                       code="missing_field" if first["type"] == "missing" else "invalid_value")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr) if value is not None else "null"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json_body(body: bytes) -> dict:
    """Strict UTF-8 JSON object (no NaN/Infinity): what every POST endpoint accepts. Raises `OpenAIError` 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request(f"request body must be a JSON object, got {type(value).__name__}", code="invalid_json")
    if "\\u" in text:  # an escaped lone surrogate ("\\ud800") decodes to a str that is not valid Unicode
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("request body holds a lone UTF-16 surrogate escape", code="invalid_encoding") from None
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ---- requests ------------------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = Field(False, description="Send a last chunk with usage (and choices []).")


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str = Field(description="A name listed by /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Keep the k most likely tokens; -1 or 0 = off (vLLM extension).")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list, description="Up to max_stop strings; a string or a list.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="vLLM extension.")
    ignore_eos: bool = Field(False, description="Keep generating after EOS (vLLM extension).")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1],
                             description="Choice j of a prompt uses (seed + j) mod 2^63.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from the logits of tokens in the "
                                    "output so far.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Times each token's count in the output so far, "
                                     "subtracted from its logit.")
    repetition_penalty: float = Field(1.0, gt=0, description="vLLM extension: tokens in the prompt or output get "
                                      "positive logits divided, negative ones multiplied by it; 1 = off.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description=f"Token id (a string of digits) -> bias in [-100, 100] added to its logit; at most "
                          f"{MAX_LOGIT_BIAS} entries.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        return [] if v is None else [v] if isinstance(v, str) else v

    def check(self, limits: IngressLimits) -> None:
        """Limits and unsupported options; raises `OpenAIError` 400 naming the field."""
        if self.max_tokens is not None and self.max_tokens > limits.max_tokens:
            raise bad_request(f"max_tokens: must be <= {limits.max_tokens}, got {self.max_tokens}", "max_tokens")
        if self.n > limits.max_n:
            raise bad_request(f"n: must be <= {limits.max_n}, got {self.n}", "n")
        if len(self.stop) > limits.max_stop:
            raise bad_request(f"stop: at most {limits.max_stop} strings, got {len(self.stop)}", "stop")
        for s in self.stop:
            if not s or len(s) > limits.max_stop_length:
                raise bad_request(f"stop: each string must have 1 to {limits.max_stop_length} characters, got "
                                  f"{len(s)}", "stop")
        if len(self.stop_token_ids) > limits.max_stop_token_ids:
            raise bad_request(f"stop_token_ids: at most {limits.max_stop_token_ids}, got {len(self.stop_token_ids)}",
                              "stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options: only allowed when stream is true", "stream_options")
        self.bias()
        for name, value in self.unsupported().items():
            raise bad_request(f"{name}: not supported, got {_short(value)}", name, code="unsupported_parameter")

    def unsupported(self) -> dict[str, Any]:
        """Modelled fields set to something we cannot honour."""
        return {}

    def bias(self) -> dict[int, float]:
        """`logit_bias` with integer token ids (their range is checked against the vocabulary later)."""
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(bias)}", "logit_bias")
        bad = [k for k in bias if not (k.isascii() and k.isdigit() and len(k) <= 18)]
        if bad:
            raise bad_request(f"logit_bias: keys are token ids (strings of digits), got {_short(bad[:5])}",
                              "logit_bias")
        return {int(k): v for k, v in bias.items()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                           {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                           {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1,
                                                                      "items": {"type": "integer", "minimum": 0}}}]}


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is normalized to a list of prompts (text or token ids)."""

    prompt: Annotated[list[str | list[int]], WithJsonSchema(PROMPT_SCHEMA)] = Field(
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids.")
    max_tokens: int | None = Field(None, ge=0, description="Most tokens to generate per choice; 0 only with echo "
                                   "(the prompt and its logprobs, nothing generated).")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text (and, with logprobs, the "
                       "prompt tokens' logprobs).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Each token's logprob and this many "
                                 "most likely tokens at its position (OpenAI allows up to 5, we as vLLM "
                                 f"{MAX_LOGPROBS}).")
    suffix: str | None = Field(None, description="Not supported (must be null).")
    best_of: int | None = Field(None, description="Only null or equal to n is supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not v:
            raise ValueError("expected a string or a non-empty list (of strings, of token ids, or of lists of "
                             "token ids)")
        if all(_is_token_id(t) for t in v):
            return [v]
        if all(isinstance(p, str) for p in v):
            return v
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in v):
            return v
        raise ValueError("expected a string, a list of strings, a non-empty list of token ids (integers >= 0) or a "
                         "list of such lists")

    def check(self, limits: IngressLimits) -> None:
        super().check(limits)
        if len(self.prompt) > limits.max_prompts:
            raise bad_request(f"prompt: at most {limits.max_prompts} prompts, got {len(self.prompt)}", "prompt")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens: 0 needs echo (the prompt, with its logprobs, and nothing generated)",
                              "max_tokens")

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.suffix is not None:
            out["suffix"] = self.suffix
        if self.best_of is not None and self.best_of != self.n:
            out["best_of"] = self.best_of
        return out


def _is_token_id(t) -> bool:
    return type(t) is int and t >= 0


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1)
    arguments: str | dict = Field("{}", description="JSON text (OpenAI's form) or an object.")


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, rendered back into the prompt by the chat template."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    """One turn. `content` is a string, null, or a list of `{"type": "text", "text": ...}` parts (joined by "\\n").
    An assistant turn may carry `tool_calls`; a `tool` turn is the result of the call `tool_call_id`."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCallIn] | None = Field(None, description="assistant: the calls it made.")
    tool_call_id: str | None = Field(None, description="tool: the call this answers.")
    name: str | None = None

    @model_validator(mode="after")
    def _tool_calls_of_assistant(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages carry tool calls, this one is {self.role!r}")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v):
        if v is None or isinstance(v, str):
            return v or ""
        if not isinstance(v, list):
            raise ValueError("expected a string, null or a list of text parts")
        texts = []
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(description="The conversation; at least one message.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins if both.")
    logprobs: bool = Field(False, description="Return each generated token's logprob.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many most "
                                     "likely tokens at each position.")
    tools: list[dict] | None = Field(None, description="Functions the model may call ({\"type\": \"function\", "
                                     "\"function\": {\"name\", \"description\", \"parameters\"}}); docs/api.md.")
    tool_choice: str | dict | None = Field(None, description="\"none\", \"auto\" (default with tools), "
                                           "\"required\" or {\"type\": \"function\", \"function\": {\"name\"}}; "
                                           "the last two are enforced while decoding.")
    parallel_tool_calls: bool = Field(True, description="false: at most one tool call per answer.")
    response_format: dict | None = Field(None, description="{\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                         "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", "
                                         "\"strict\"}}: enforced while decoding (docs/api.md).")

    def model_post_init(self, _context) -> None:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens

    def check(self, limits: IngressLimits) -> None:
        if not self.messages:
            raise bad_request("messages: must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        super().check(limits)



from moemesh.actors.ingress.responses import (  # noqa: F401  (re-exported: the wire types live together here)
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatFinishReason,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    FunctionCallOut,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
)


def inline_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its `$defs` inlined, for embedding in an OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)
