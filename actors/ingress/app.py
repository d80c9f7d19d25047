"""The HTTP front door: an OpenAI-compatible FastAPI app that validates and tokenizes requests, sends each to the
least loaded attention worker and streams the answer back (server-sent events) or returns it whole.

`Ingress` is a plain class (no Ray): give it a `TextCodec` and objects that satisfy `Worker` (defined in
`generation.py` with `LeastLoadedRouter`; the request's parameters and the worker's deltas are `RequestParams` and
`Delta` of actors/request.py). The cluster builder
turns it into a Serve deployment with `serve.deployment(serve.ingress()(Ingress))`; Serve then asks
`__serve_build_asgi_app__` for the app. One request flows: the gate (`gate.py`: API key 401, admission 429) -> read
the body (413 above the limit) -> parse and validate (`protocol.py`, 400/404) -> tokenize, check the context ->
pick a worker (429 when all are full) -> `Generation` runs one worker stream per choice and turns deltas into text
(detokenized, cut at stop strings) -> SSE chunks or one JSON answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from moemesh import __version__
from moemesh.actors.ingress.formats import ChatFormat, CompletionFormat
from moemesh.actors.ingress.gate import Admission, ApiKeys, Gate
from moemesh.actors.ingress.generation import Choice, Generation, LeastLoadedRouter, Worker
from moemesh.actors.ingress.logprobs import LogprobsBuffer
from moemesh.actors.ingress.metrics import Metrics, process_metrics
from moemesh.actors.ingress.prefix_routing import PrefixRoutingConfig
from moemesh.actors.ingress.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    IngressLimits,
    ModelCard,
    ModelList,
    OpenAIError,
    bad_request,
    inline_schema,
    parse_json_body,
    to_openai_error,
    unavailable,
)
from moemesh.actors.ingress.text import StopCutter, TextCodec
from moemesh.actors.ingress.structured import response_format_output
from moemesh.actors.request import Delta, RequestParams, check_token_ids

__all__ = ["Delta", "Ingress", "LeastLoadedRouter", "RequestParams", "Worker"]
log = logging.getLogger(__name__)


# ---- the HTTP app --------------------------------------------------------------------------------------------------
class Ingress:
    """The OpenAI-compatible HTTP app over `workers`; `http_app` is the FastAPI app (see the module docstring).
    `api_keys`: bearer keys required on every path but /health, the OpenAPI schema and its browser (and `/metrics*`
    when `public_metrics`); none: the API is open. `prefix_routing`: route by prompt prefix (None: by load only)."""

    def __init__(self, codec: TextCodec, workers: Sequence[Worker], model_name: str, context_length: int,
                 limits: IngressLimits | None = None, metrics: Metrics | None = None, *,
                 api_keys: Sequence[str] = (), public_metrics: bool = False,
                 prefix_routing: PrefixRoutingConfig | None = PrefixRoutingConfig()):
        self.codec, self.model_name = codec, model_name
        self.limits = lim = limits or IngressLimits()
        self.context_length = lim.context_length or context_length
        self.max_prompt_tokens = min(lim.max_prompt_tokens or self.context_length, self.context_length - 1)
        self.router = LeastLoadedRouter(workers, lim.load_timeout_s, lim.max_worker_load, lim.retry_after_s,
                                        prefix_routing)
        self.admission = Admission(lim.max_in_flight, lim.max_concurrent_per_key, lim.retry_after_s)
        self.metrics = metrics or process_metrics()
        self.created = int(time.time())
        self.http_app = self._build_app(ApiKeys(api_keys), public_metrics)

    @classmethod
    def from_checkpoint(cls, path: str | Path, workers: Sequence[Worker], model_name: str | None = None,
                        limits: IngressLimits | None = None, metrics: Metrics | None = None, *,
                        api_keys: Sequence[str] = (), public_metrics: bool = False,
                        prefix_routing: PrefixRoutingConfig | None = PrefixRoutingConfig()) -> Ingress:
        """Tokenizer and chat template from the checkpoint; context length from its config.json; the model is
        served as `model_name` (default: the directory's name)."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config.get("max_position_embeddings"), int):
            raise ValueError(f"{path / 'config.json'}: max_position_embeddings: expected an int")
        return cls(TextCodec.from_checkpoint(path), workers, model_name or path.resolve().name,
                   config["max_position_embeddings"], limits, metrics, api_keys=api_keys,
                   public_metrics=public_metrics, prefix_routing=prefix_routing)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Ray Serve's hook for `serve.ingress()` without an app argument."""
        return self.http_app

    def _build_app(self, keys: ApiKeys, public_metrics: bool) -> FastAPI:
        app = FastAPI(title="moemesh", version=__version__, summary="OpenAI-compatible API of a moemesh cluster.")
        app.add_exception_handler(StarletteHTTPException, self._http_exception)
        open_paths = {"/health", app.openapi_url, app.docs_url, app.docs_url + "/oauth2-redirect", app.redoc_url}
        if public_metrics:
            open_paths |= {"/metrics", "/metrics/targets"}
        app.add_middleware(Gate, keys=keys, admission=self.admission, open_paths=open_paths, reject=self._error)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_text, methods=["GET"])
        app.add_api_route("/v1/models", self.list_models, methods=["GET"], response_model=ModelList)
        app.add_api_route("/v1/models/{model:path}", self.get_model, methods=["GET"], response_model=ModelCard)
        errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
        for path, handler, req, resp in (("/v1/completions", self.completions, CompletionRequest, CompletionResponse),
                                         ("/v1/chat/completions", self.chat_completions, ChatCompletionRequest,
                                          ChatCompletionResponse)):
            body = {"required": True, "content": {"application/json": {"schema": inline_schema(req)}}}
            app.add_api_route(path, handler, methods=["POST"], openapi_extra={"requestBody": body},
                              responses={200: {"model": resp}, **errors})
        return app

    # ---- endpoints ----
    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        return await self._generate(request, CompletionRequest, CompletionFormat)

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        return await self._generate(request, ChatCompletionRequest, ChatFormat)

    async def list_models(self) -> dict:
        return ModelList(data=[self._card()]).model_dump()

    async def get_model(self, model: str) -> Response:
        try:
            self._check_model(model)
        except OpenAIError as e:
            return self._error(e)
        return JSONResponse(self._card().model_dump())

    async def health(self) -> Response:
        """200 while at least one worker answers `load()`, else 503."""
        loads = await self.router.loads()
        healthy = sum(load is not None for load in loads)
        if not healthy:  # not counted as a request error: probes would drown the real ones
            return JSONResponse(unavailable("no attention worker is available", code="no_worker").body(), 503)
        return JSONResponse({"status": "ok", "workers": len(loads), "healthy_workers": healthy})

    async def metrics_text(self) -> Response:
        body, content_type = self.metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    # ---- one generation request ----
    async def _generate(self, request: Request, request_cls: type[CompletionRequest | ChatCompletionRequest],
                        format_cls: type[CompletionFormat]) -> Response:
        arrival = time.perf_counter()
        try:
            req = request_cls.model_validate(parse_json_body(await _read_body(request, self.limits.max_body_bytes)))
            self._check_model(req.model)
            req.check(self.limits)
            fmt = format_cls.for_request(self.model_name, req)
            choices, prompt_tokens = self._choices(req, fmt)
            worker = await self.router.pick(prompt=choices[0].prompt_ids)  # all prompts of a request go there
            gen = Generation(worker, choices, self.limits.stream_idle_timeout_s, prompt_tokens, started_at=arrival,
                             router=self.router)
        except Exception as e:
            return self._error(e)
        gen.start()
        self.metrics.ingress_requests_in_progress.labels(self.model_name).inc()
        return await (self._stream(request, gen, fmt) if req.stream else self._complete(request, gen, fmt))

    async def _stream(self, request: Request, gen: Generation, fmt: CompletionFormat) -> Response:
        """Wait for the first event (so a request failing early still gets an error status), then stream."""
        events = gen.events()

        async def first() -> Choice:
            return await anext(events)

        try:
            head = await _unless_client_gone(request, first())
        except _ClientGone:
            self._done(gen)
            return Response(status_code=499)
        except BaseException as e:
            self._done(gen, failed=True)
            if isinstance(e, Exception):
                return self._error(e)
            raise
        return StreamingResponse(self._event_stream(gen, fmt, head, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(self._done, gen))

    async def _event_stream(self, gen: Generation, fmt: CompletionFormat, head: Choice,
                            events: AsyncIterator[Choice]) -> AsyncIterator[str]:
        failed = False
        try:
            for chunk in fmt.opening(gen.choices):
                yield _sse_event(chunk)
            choice = head
            while choice is not None:
                chunk = fmt.chunk(choice, choice.release())
                if chunk is not None:
                    yield _sse_event(chunk)
                choice = await anext(events, None)
            if fmt.include_usage:
                yield _sse_event(fmt.usage_chunk(gen.usage()))
        except Exception as e:  # headers are sent: the error becomes the last event
            failed = True
            yield _sse_event(self._count_error(e, status=200).body())
        finally:  # also on cancellation (client gone): abort the worker sequences
            self._done(gen, failed)
        yield "data: [DONE]\n\n"

    async def _complete(self, request: Request, gen: Generation, fmt: CompletionFormat) -> Response:
        texts: dict[int, list[str]] = {c.index: [] for c in gen.choices}

        async def drain() -> None:
            async for choice in gen.events():
                texts[choice.index].append(choice.release())

        failed = True
        try:
            await _unless_client_gone(request, drain())
            failed = False
            return JSONResponse(fmt.response(gen.choices, {i: "".join(t) for i, t in texts.items()}, gen.usage()))
        except _ClientGone:  # nobody reads this answer; `_done` aborts the sequences
            failed = False
            return Response(status_code=499)
        except Exception as e:
            return self._error(e)
        finally:
            self._done(gen, failed)

    def _choices(self, req: CompletionRequest | ChatCompletionRequest,
                 fmt: CompletionFormat) -> tuple[list[Choice], int]:
        """The worker sequences of a request: n per prompt, choice index = prompt index * n + j, seed + j."""
        request_id, tools = fmt.id, fmt.tools
        self._check_tokens(req.stop_token_ids, "stop_token_ids")
        bias = req.bias()
        self._check_tokens(list(bias), "logit_bias")
        chat = isinstance(req, ChatCompletionRequest)
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        prompt_logprobs = None if chat or not req.echo else req.logprobs
        structured = tools.structured or (response_format_output(req.response_format) if chat else None)
        choices, prompt_tokens = [], 0
        for p, (ids, echo) in enumerate(self._prompts(req, tools.tools)):
            max_tokens = self._max_tokens(len(ids), req)
            prompt_tokens += len(ids)
            for j in range(req.n):
                params = self._params(
                    max_tokens=max(max_tokens, 1), temperature=req.temperature, top_p=req.top_p,
                    top_k=max(req.top_k, 0), seed=None if req.seed is None else (req.seed + j) % 2**63, stop=req.stop,
                    stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                    logit_bias=bias, structured=structured)
                index = p * req.n + j
                buffer = None if logprobs is None else LogprobsBuffer(self.codec.token_piece,
                                                                      "chat" if chat else "completion")
                choices.append(Choice(index, f"{request_id}-{index}", ids, params,
                                      self.codec.decoder(tool_markup=bool(tools.names)),
                                      StopCutter(req.stop), echo, logprobs=buffer, echo_only=max_tokens == 0,
                                      prompt=p))
        return choices, prompt_tokens

    def _prompts(self, req: CompletionRequest | ChatCompletionRequest,
                 tools: list[dict] | None = None) -> list[tuple[list[int], str]]:
        """(token ids, echo text) per prompt; `tools`: what the chat template shows."""
        if isinstance(req, ChatCompletionRequest):
            return [(self.codec.encode_chat(req.messages, tools), "")]
        out = []
        for prompt in req.prompt:
            if isinstance(prompt, str):
                ids = self.codec.encode(prompt)
                if not ids:
                    raise bad_request("prompt: no tokens after tokenization", "prompt")
            else:
                ids = self._check_tokens(prompt, "prompt")
            echo = "" if not req.echo else prompt if isinstance(prompt, str) else self.codec.decode(ids)
            out.append((ids, echo))
        return out

    def _max_tokens(self, n_prompt: int, req: CompletionRequest | ChatCompletionRequest) -> int:
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        if n_prompt > self.max_prompt_tokens:
            raise bad_request(f"{param}: {n_prompt} tokens, more than the limit of {self.max_prompt_tokens}", param,
                              "context_length_exceeded")
        room = self.context_length - n_prompt
        if req.max_tokens is None:
            default = self.limits.max_tokens if param == "messages" else self.limits.default_completion_tokens
            return min(default, room)
        if req.max_tokens > room:
            raise bad_request(f"This model's maximum context length is {self.context_length} tokens. However, you "
                              f"requested {n_prompt + req.max_tokens} tokens ({n_prompt} in the {param}, "
                              f"{req.max_tokens} for the completion).", "max_tokens", "context_length_exceeded")
        return req.max_tokens

    def _check_tokens(self, ids: list[int], param: str) -> list[int]:
        try:
            return check_token_ids(ids, self.codec.vocab_size, param)
        except ValueError as e:
            raise bad_request(str(e), param) from None

    @staticmethod
    def _params(**fields) -> RequestParams:
        try:
            return RequestParams(**fields)
        except ValidationError as e:
            first = e.errors()[0]
            param = str(first["loc"][0]) if first.get("loc") else None
            raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param) from None

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.context_length)

    # ---- bookkeeping ----
    def _done(self, gen: Generation, failed: bool = False) -> None:
        """Close `gen` (aborting what the worker still runs) and record its metrics, once. A failed request counts
        its tokens (the workers made them) but not its latencies; `_count_error` counts the failure."""
        if gen.closed:
            return
        gen.close()
        m, name = self.metrics, self.model_name
        m.ingress_requests_in_progress.labels(name).dec()
        m.prompt_tokens.labels(name).inc(gen.prompt_tokens)
        m.generation_tokens.labels(name).inc(gen.completion_tokens)
        if failed:
            return
        m.e2e_request_latency.labels(name).observe(time.perf_counter() - gen.started_at)
        for c in gen.choices:
            m.request_success.labels(name, c.finish_reason).inc()
            if c.first_token_at is not None:
                m.time_to_first_token.labels(name).observe(c.first_token_at - gen.started_at)
                if c.tokens > 1 and c.finished_at is not None:
                    m.time_per_output_token.labels(name).observe((c.finished_at - c.first_token_at) / (c.tokens - 1))

    def _count_error(self, exc: BaseException, status: int | None = None) -> OpenAIError:
        err = to_openai_error(exc)
        if err.status >= 500:
            log.error("request failed: %s", err.message, exc_info=err.status == 500 and exc is not err)
        self.metrics.request_errors.labels(self.model_name, str(status or err.status), err.code or err.type).inc()
        return err

    def _error(self, exc: BaseException) -> JSONResponse:
        err = self._count_error(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def _http_exception(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return self._error(OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))


# ---- HTTP helpers --------------------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one larger than `limit` bytes by its Content-Length or while it arrives."""
    too_large = OpenAIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large if length.isdigit() else bad_request("Content-Length: not a number", code="invalid_header")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # nobody will read the answer; 400 keeps it out of the server-error counts
        raise bad_request("the client disconnected while sending the body", code="client_disconnected") from None
    return bytes(body)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_client_gone(request: Request, work: Coroutine):
    """`await work`, or raise `_ClientGone` (cancelling it) if the client disconnects first."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise _ClientGone()
        return task.result()
    finally:
        task.cancel()
        gone.cancel()


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (never, if the server cannot tell)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:
        await asyncio.Event().wait()


def _sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
