"""Ingress: the OpenAI-compatible HTTP app against fake workers (deterministic token scripts), in process with
httpx's ASGI transport; bad input of every kind gets OpenAI-style error JSON with a 4xx and never reaches a worker;
least-loaded routing; a client leaving mid-stream aborts the worker's sequence; metrics; and the official `openai`
client against a real uvicorn server."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading

import httpx
import pytest

from moemesh.actors.ingress.app import Ingress, LeastLoadedRouter, Worker
from moemesh.actors.ingress.metrics import Metrics
from moemesh.actors.ingress.protocol import IngressLimits
from moemesh.actors.ingress.text import TextCodec
from moemesh.actors.request import Delta, RequestParams

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
SCRIPT_TEXT = " Hello world! The expert mesh 😀 routes every token."
MODEL = "tiny"
PROMPT = "The expert"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def codec(tiny_model_dir) -> TextCodec:
    return TextCodec.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def script(codec) -> list[int]:
    return codec.tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False).ids


class FakeWorker:
    """A deterministic attention worker: a sequence emits `script` one token per delta, rotated by its seed, ending
    with "stop" at the script's end or "length" at max_tokens. `endless` cycles the script forever; `fail_at` raises
    before that token; `load_base` is added to its running count."""

    def __init__(self, script, load_base=0.0, delay=0.0, endless=False, fail_at=None, error=RuntimeError,
                 no_finish=False, burst=False):
        self.script, self.load_base, self.delay, self.endless = script, load_base, delay, endless
        self.fail_at, self.error, self.no_finish = fail_at, error, no_finish
        self.burst = burst  # never yield to the event loop: the whole script is queued before the ingress reads
        self.calls: list[tuple[str, list[int], RequestParams]] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.running = 0

    async def generate(self, request_id, prompt_token_ids, params):
        self.calls.append((request_id, list(prompt_token_ids), params))
        self.running += 1
        shift = (params.seed or 0) % len(self.script)
        tokens = self.script[shift:] + self.script[:shift]
        try:
            for i, token in enumerate(itertools.cycle(tokens) if self.endless else tokens):
                if i == self.fail_at:
                    raise self.error("worker exploded")
                if not self.burst:
                    await asyncio.sleep(self.delay)
                finish = "length" if i + 1 == params.max_tokens else None
                if not self.endless and i + 1 == len(tokens) and not self.no_finish:
                    finish = finish or "stop"
                yield Delta([token], finish)
                if finish:
                    return
        finally:
            self.running -= 1
            self.closed.append(request_id)

    async def load(self) -> float:
        return self.load_base + self.running

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


class DeadWorker(FakeWorker):
    async def load(self) -> float:
        raise ConnectionError("gone")


def make_ingress(model_dir, *workers, **limits) -> Ingress:
    return Ingress.from_checkpoint(model_dir, list(workers), model_name=MODEL, limits=IngressLimits(**limits),
                                   metrics=Metrics(process_collectors=False))


def client(ingress: Ingress) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(ingress.http_app), base_url="http://ingress")


def sse_events(body: str) -> list:
    """Parse an SSE body strictly: every event is `data: ...` + blank line; the last is [DONE]."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


async def eventually(check, timeout=3.0):
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# ---- happy paths ---------------------------------------------------------------------------------------------------
async def test_models_and_health(tiny_model_dir, script):
    ing = make_ingress(tiny_model_dir, FakeWorker(script), context_length=1024)
    async with client(ing) as c:
        models = (await c.get("/v1/models")).json()
        assert models == {"object": "list", "data": [{"id": MODEL, "object": "model", "created": ing.created,
                                                     "owned_by": "moemesh", "max_model_len": 1024}]}
        assert (await c.get(f"/v1/models/{MODEL}")).json() == models["data"][0]
        r = await c.get("/v1/models/gpt-4")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert (await c.get("/health")).json() == {"status": "ok", "workers": 1, "healthy_workers": 1}
    async with client(make_ingress(tiny_model_dir, DeadWorker(script))) as c:
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"


async def test_completion(tiny_model_dir, codec, script):
    worker = FakeWorker(script)
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5,
                                                  "temperature": 0, "user": "ignored", "unknown_field": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_ids = codec.encode(PROMPT)
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert body == {"id": body["id"], "object": "text_completion", "created": body["created"], "model": MODEL,
                    "choices": [{"index": 0, "text": codec.decode(script[:5]), "logprobs": None,
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                              "total_tokens": len(prompt_ids) + 5}}
    (rid, ids, params), = worker.calls
    assert rid == body["id"] + "-0" and ids == prompt_ids
    assert params == RequestParams(max_tokens=5, temperature=0.0)


async def test_completion_defaults_and_stop_at_end(tiny_model_dir, codec, script):
    worker = FakeWorker(script)
    async with client(make_ingress(tiny_model_dir, worker, default_completion_tokens=100)) as c:
        body = (await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT})).json()
    assert body["choices"][0] == {"index": 0, "text": SCRIPT_TEXT, "logprobs": None, "finish_reason": "stop"}
    assert body["usage"]["completion_tokens"] == len(script)
    assert worker.calls[0][2].max_tokens == 100 and worker.calls[0][2].temperature == 1.0
    assert worker.aborted == []  # the worker finished every sequence itself


async def test_completion_stream(tiny_model_dir, codec, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script))) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 40,
                                                  "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    rid = chunks[0]["id"]
    for ch in chunks:
        assert set(ch) == {"id", "object", "created", "model", "choices"}  # no usage key without include_usage
        assert ch["id"] == rid and ch["object"] == "text_completion" and ch["model"] == MODEL
        (choice,) = ch["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and "\ufffd" not in choice["text"]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == SCRIPT_TEXT
    assert len(chunks) < len(script)  # the emoji's byte tokens were held back and sent as one piece


async def test_stream_include_usage(tiny_model_dir, codec, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script))) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    chunks = sse_events(r.text)
    assert all(ch["usage"] is None for ch in chunks[:-1])
    n_prompt = len(codec.encode(PROMPT))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": n_prompt, "completion_tokens": 3, "total_tokens": n_prompt + 3}


async def test_chat(tiny_model_dir, codec, script):
    worker = FakeWorker(script)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        body = (await c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                           "max_completion_tokens": 4})).json()
    prompt = "<bos>Be brief.<｜User｜>Hi\nthere<｜Assistant｜>"  # the tiny model's chat_template
    prompt_ids = codec.tokenizer.encode(prompt, add_special_tokens=False).ids  # the template writes specials
    assert worker.calls[0][1] == prompt_ids
    assert body["id"].startswith("chatcmpl-")
    assert body == {"id": body["id"], "object": "chat.completion", "created": body["created"], "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": codec.decode(script[:4])},
                                 "logprobs": None, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 4,
                              "total_tokens": len(prompt_ids) + 4}}


async def test_chat_stream(tiny_model_dir, codec, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script))) as c:
        r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "stream": True})
    chunks = sse_events(r.text)
    assert all(ch["object"] == "chat.completion.chunk" and ch["id"].startswith("chatcmpl-") for ch in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(set(ch["choices"][0]["delta"]) <= {"content"} for ch in chunks[1:])
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == SCRIPT_TEXT


async def test_n_and_batched_prompts(tiny_model_dir, codec, script):
    worker = FakeWorker(script)
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        body = (await c.post("/v1/completions", json={"model": MODEL, "prompt": ["A", "B c"], "n": 2, "seed": 1,
                                                      "max_tokens": 3})).json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    texts = [ch["text"] for ch in body["choices"]]
    assert texts[0] == texts[2] == codec.decode(script[1:4]) and texts[1] == texts[3] == codec.decode(script[2:5])
    assert sorted(p.seed for _, _, p in worker.calls) == [1, 1, 2, 2]
    n_prompt = len(codec.encode("A")) + len(codec.encode("B c"))  # each prompt counted once, not per choice
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}


async def test_n_stream(tiny_model_dir, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script))) as c:
        r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "stream": True, "n": 3, "seed": 0, "max_tokens": 4})
    chunks = sse_events(r.text)
    finished = [ch["choices"][0]["index"] for ch in chunks if ch["choices"][0]["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1, 2] and all(len(ch["choices"]) == 1 for ch in chunks)


async def test_token_prompt_and_echo(tiny_model_dir, codec, script):
    worker = FakeWorker(script)
    ids = codec.encode(PROMPT)
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        body = (await c.post("/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True,
                                                      "max_tokens": 2})).json()
        text_echo = (await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "echo": True,
                                                           "max_tokens": 2})).json()
    assert worker.calls[0][1] == ids
    assert body["choices"][0]["text"] == codec.decode(ids) + codec.decode(script[:2])
    assert text_echo["choices"][0]["text"] == PROMPT + codec.decode(script[:2])
    assert body["usage"]["prompt_tokens"] == len(ids)


async def test_stop_strings(tiny_model_dir, script):
    worker = FakeWorker(script, delay=0.001)
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        body = (await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 50,
                                                      "stop": ["mesh", "zzz"]})).json()
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 50, "stream": True,
                                                  "stop": "expert"})
    assert body["choices"][0]["text"] == " Hello world! The expert " and body["choices"][0]["finish_reason"] == "stop"
    assert worker.calls[0][2].stop == ["mesh", "zzz"]
    chunks = sse_events(r.text)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == " Hello world! The "
    assert all("exp" not in ch["choices"][0]["text"] for ch in chunks)  # a partial stop string is never sent
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    await eventually(lambda: len(worker.aborted) == 2)  # the ingress stopped both sequences: abort them
    assert set(worker.aborted) == {call[0] for call in worker.calls} and len(worker.closed) == 2


async def test_stop_string_with_deltas_already_queued(tiny_model_dir, script):
    worker = FakeWorker(script, burst=True)
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        body = (await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 50, "n": 2,
                                                      "seed": 0, "stop": "world"})).json()
    assert body["choices"][0] == {"index": 0, "text": " Hello ", "logprobs": None, "finish_reason": "stop"}
    assert body["choices"][1]["finish_reason"] == "stop" and "world" not in body["choices"][1]["text"]


async def test_stop_token_text_is_not_returned(tiny_model_dir, codec, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script))) as c:
        body = (await c.post("/v1/completions", json=_completion(max_tokens=100, stop_token_ids=[script[-1]]))).json()
    assert body["choices"][0]["text"] == codec.decode(script[:-1]) and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(script)


# ---- routing -------------------------------------------------------------------------------------------------------
async def test_least_loaded_routing(tiny_model_dir, script):
    busy, idle = FakeWorker(script, load_base=3), FakeWorker(script)
    async with client(make_ingress(tiny_model_dir, busy, idle)) as c:
        for _ in range(3):
            assert (await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})).status_code == 200
    assert len(idle.calls) == 3 and busy.calls == []


async def test_ties_round_robin_and_dead_workers_skipped(script):
    a, b, dead = FakeWorker(script), FakeWorker(script), DeadWorker(script)
    router = LeastLoadedRouter([a, dead, b])
    assert [await router.pick() for _ in range(4)] == [a, b, a, b]
    assert isinstance(a, Worker)
    with pytest.raises(Exception, match="no attention worker"):
        await LeastLoadedRouter([dead]).pick()


async def test_routing_follows_running_requests(tiny_model_dir, script):
    """A worker busy with a long stream is avoided while it runs."""
    slow, other = FakeWorker(script, delay=0.02, endless=True), FakeWorker(script)
    async with client(make_ingress(tiny_model_dir, slow, other)) as c:
        long = asyncio.create_task(c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 20}))
        await eventually(lambda: slow.running == 1 or other.running == 1)
        busy, free = (slow, other) if slow.running else (other, slow)
        for _ in range(2):
            await c.post("/v1/completions", json={"model": MODEL, "prompt": "y", "max_tokens": 1})
        await long
    assert len(busy.calls) == 1 and len(free.calls) == 2


# ---- bad input -----------------------------------------------------------------------------------------------------
def _completion(**kw):
    return {"model": MODEL, "prompt": PROMPT, **kw}


def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


BAD = [  # (id, path, body: dict | bytes, status, param, code)
    ("invalid-json", "completions", b'{"model": "tiny", "prompt": ', 400, None, "invalid_json"),
    ("not-an-object", "completions", b"[1, 2]", 400, None, "invalid_json"),
    ("nan", "completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None, "invalid_json"),
    ("non-utf8", "completions", b'{"model": "tiny", "prompt": "\xff\xfe caf\xe9"}', 400, None, "invalid_encoding"),
    ("lone-surrogate", "completions", b'{"model": "tiny", "prompt": "\\ud800"}', 400, None, "invalid_encoding"),
    ("unknown-model", "completions", _completion(model="gpt-4"), 404, "model", "model_not_found"),
    ("unknown-model-chat", "chat/completions", _chat(model="gpt-4"), 404, "model", "model_not_found"),
    ("missing-model", "completions", {"prompt": "x"}, 400, "model", "missing_field"),
    ("missing-prompt", "completions", {"model": MODEL}, 400, "prompt", "missing_field"),
    ("missing-messages", "chat/completions", {"model": MODEL}, 400, "messages", "missing_field"),
    ("max-tokens-string", "completions", _completion(max_tokens="5"), 400, "max_tokens", "invalid_value"),
    ("max-tokens-float", "completions", _completion(max_tokens=5.0), 400, "max_tokens", "invalid_value"),
    ("stream-string", "completions", _completion(stream="yes"), 400, "stream", "invalid_value"),
    ("prompt-number", "completions", _completion(prompt=5), 400, "prompt", "invalid_value"),
    ("prompt-empty-list", "completions", _completion(prompt=[]), 400, "prompt", "invalid_value"),
    ("prompt-mixed", "completions", _completion(prompt=[1, "a"]), 400, "prompt", "invalid_value"),
    ("prompt-negative-id", "completions", _completion(prompt=[1, -2]), 400, "prompt", "invalid_value"),
    ("prompt-id-outside-vocab", "completions", _completion(prompt=[1, 10**6]), 400, "prompt", None),
    ("too-many-prompts", "completions", _completion(prompt=["a"] * 17), 400, "prompt", None),
    ("max-tokens-zero-without-echo", "completions", _completion(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", "completions", _completion(max_tokens=-1, echo=True), 400, "max_tokens",
     "invalid_value"),
    ("chat-max-tokens-zero", "chat/completions", _chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max-tokens-above-limit", "completions", _completion(max_tokens=4097), 400, "max_tokens", None),
    ("max-completion-tokens-zero", "chat/completions", _chat(max_completion_tokens=0), 400,
     "max_completion_tokens", "invalid_value"),
    ("temperature-negative", "completions", _completion(temperature=-0.1), 400, "temperature", "invalid_value"),
    ("top-p-zero", "completions", _completion(top_p=0), 400, "top_p", "invalid_value"),
    ("top-p-above-one", "chat/completions", _chat(top_p=1.01), 400, "top_p", "invalid_value"),
    ("top-k-below-minus-one", "completions", _completion(top_k=-2), 400, "top_k", "invalid_value"),
    ("n-zero", "completions", _completion(n=0), 400, "n", "invalid_value"),
    ("n-above-limit", "chat/completions", _chat(n=9), 400, "n", None),
    ("seed-too-large", "completions", _completion(seed=2**63), 400, "seed", "invalid_value"),
    ("seed-negative", "completions", _completion(seed=-1), 400, "seed", "invalid_value"),
    ("empty-messages", "chat/completions", _chat(messages=[]), 400, "messages", None),
    ("bad-role", "chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), 400,
     "messages[0].role", "invalid_value"),
    ("image-part", "chat/completions", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages[0].content", "invalid_value"),
    ("too-many-stops", "completions", _completion(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("stop-too-long", "completions", _completion(stop=["x" * 257]), 400, "stop", None),
    ("stop-empty", "completions", _completion(stop=[""]), 400, "stop", None),
    ("stop-not-string", "completions", _completion(stop=[1]), 400, "stop[0]", "invalid_value"),
    ("stop-token-outside-vocab", "completions", _completion(stop_token_ids=[10**6]), 400, "stop_token_ids", None),
    ("stream-options-without-stream", "completions", _completion(stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("logprobs-above-20", "completions", _completion(logprobs=21), 400, "logprobs", "invalid_value"),
    ("logprobs-negative", "completions", _completion(logprobs=-1), 400, "logprobs", "invalid_value"),
    ("logprobs-bool", "completions", _completion(logprobs=True), 400, "logprobs", "invalid_value"),
    ("chat-logprobs-int", "chat/completions", _chat(logprobs=2), 400, "logprobs", "invalid_value"),
    ("top-logprobs-above-20", "chat/completions", _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs",
     "invalid_value"),
    ("top-logprobs-negative", "chat/completions", _chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs",
     "invalid_value"),
    ("top-logprobs-without-logprobs", "chat/completions", _chat(top_logprobs=2), 400, "top_logprobs", None),
    ("presence-penalty-above-2", "completions", _completion(presence_penalty=2.5), 400, "presence_penalty",
     "invalid_value"),
    ("frequency-penalty-below-minus-2", "chat/completions", _chat(frequency_penalty=-2.01), 400,
     "frequency_penalty", "invalid_value"),
    ("repetition-penalty-zero", "completions", _completion(repetition_penalty=0), 400, "repetition_penalty",
     "invalid_value"),
    ("logit-bias-outside-vocab", "completions", _completion(logit_bias={"100000": 1}), 400, "logit_bias", None),
    ("logit-bias-not-an-id", "chat/completions", _chat(logit_bias={"hello": 1}), 400, "logit_bias", None),
    ("logit-bias-negative-id", "completions", _completion(logit_bias={"-3": 1}), 400, "logit_bias", None),
    ("logit-bias-above-100", "completions", _completion(logit_bias={"5": 100.5}), 400, "logit_bias.5",
     "invalid_value"),
    ("logit-bias-string-value", "completions", _completion(logit_bias={"5": "1"}), 400, "logit_bias.5",
     "invalid_value"),
    ("logit-bias-too-many", "completions", _completion(logit_bias={str(i): 1 for i in range(1025)}), 400,
     "logit_bias", None),
    ("tools-no-function", "chat/completions", _chat(tools=[{"type": "function"}]), 400, "tools", None),
    ("tools-invalid-schema", "chat/completions", _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "objectt"}}}]), 400, "tools", None),
    ("tool-choice-unknown-name", "chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                           tool_choice={"type": "function", "function": {"name": "g"}}),
     400, "tool_choice", None),
    ("tool-choice-required-no-tools", "chat/completions", _chat(tool_choice="required"), 400, "tool_choice", None),
    ("json-mode-unknown-type", "chat/completions", _chat(response_format={"type": "json"}), 400, "response_format",
     None),
    ("json-schema-invalid", "chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectt"}}}), 400, "response_format", None),
    ("json-schema-unsupported", "chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "multipleOf": 3}}}), 400, "response_format", None),
    ("best-of", "completions", _completion(best_of=3), 400, "best_of", "unsupported_parameter"),
    ("prompt-longer-than-context", "completions", _completion(prompt=list(range(1, 70))), 400, "prompt",
     "context_length_exceeded"),
    ("chat-longer-than-context", "chat/completions", _chat(messages=[{"role": "user", "content": "word " * 100}]),
     400, "messages", "context_length_exceeded"),
    ("prompt-plus-max-tokens", "completions", _completion(prompt=list(range(1, 50)), max_tokens=20), 400,
     "max_tokens", "context_length_exceeded"),
]


@pytest.mark.parametrize("path,body,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_input(tiny_model_dir, script, path, body, status, param, code):
    worker = FakeWorker(script)
    async with client(make_ingress(tiny_model_dir, worker, context_length=64)) as c:
        if isinstance(body, bytes):
            r = await c.post(f"/v1/{path}", content=body, headers={"content-type": "application/json"})
        else:
            r = await c.post(f"/v1/{path}", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert worker.calls == []


async def test_oversized_body(tiny_model_dir, script):
    worker = FakeWorker(script)
    big = json.dumps(_completion(prompt="x" * 2000)).encode()

    async def chunked():  # no Content-Length: the limit is enforced while the body streams in
        for i in range(0, len(big), 100):
            yield big[i:i + 100]

    async with client(make_ingress(tiny_model_dir, worker, max_body_bytes=1000)) as c:
        by_header = await c.post("/v1/completions", content=big)
        by_stream = await c.post("/v1/chat/completions", content=chunked())
        fits = await c.post("/v1/completions", json=_completion())
    assert "content-length" not in by_stream.request.headers
    for r in (by_header, by_stream):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert fits.status_code == 200 and len(worker.calls) == 1


async def test_unknown_route_and_method(tiny_model_dir, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script))) as c:
        missing, wrong_method = await c.get("/v1/engines"), await c.get("/v1/completions")
    assert missing.status_code == 404 and set(missing.json()["error"]) == ERROR_KEYS
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


# ---- worker failures -----------------------------------------------------------------------------------------------
async def test_worker_error_mid_stream(tiny_model_dir, codec, script):
    worker = FakeWorker(script, fail_at=3)
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        r = await c.post("/v1/completions", json=_completion(max_tokens=10, stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == codec.decode(script[:3])
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "worker_error"
    assert "worker exploded" in events[-1]["error"]["message"]


@pytest.mark.parametrize("error,status,code", [(RuntimeError, 503, "worker_error"), (ValueError, 400, None)])
@pytest.mark.parametrize("stream", [False, True])
async def test_worker_error_before_first_token(tiny_model_dir, script, error, status, code, stream):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script, fail_at=0, error=error))) as c:
        r = await c.post("/v1/chat/completions", json=_chat(stream=stream))
    assert r.status_code == status and r.json()["error"]["code"] == code


async def test_worker_stream_without_finish(tiny_model_dir, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script, no_finish=True))) as c:
        r = await c.post("/v1/completions", json=_completion(max_tokens=100))
    assert r.status_code == 503 and "without a finish_reason" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_silent_worker_times_out(tiny_model_dir, script, stream):
    worker = FakeWorker(script, delay=30)
    async with client(make_ingress(tiny_model_dir, worker, stream_idle_timeout_s=0.2)) as c:
        r = await c.post("/v1/completions", json=_completion(stream=stream))
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_timeout"
    await eventually(lambda: worker.aborted == [worker.calls[0][0]] and worker.closed == worker.aborted)


async def test_no_worker_available(tiny_model_dir, script):
    worker = DeadWorker(script)
    async with client(make_ingress(tiny_model_dir, worker)) as c:
        r = await c.post("/v1/completions", json=_completion())
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker" and worker.calls == []


# ---- client disconnects --------------------------------------------------------------------------------------------
async def _call_then_disconnect(app, body: dict, after_chunks: int) -> list[bytes]:
    """Drive the ASGI app by hand: send the request, then disconnect once `after_chunks` body chunks arrived."""
    payload, sent, gone = json.dumps(body).encode(), [], asyncio.Event()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]}
    messages = iter([{"type": "http.request", "body": payload, "more_body": False}])

    async def receive():
        message = next(messages, None)
        if message is None:
            await gone.wait()
            return {"type": "http.disconnect"}
        return message

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if len(sent) >= after_chunks:
                gone.set()

    if after_chunks == 0:
        asyncio.get_running_loop().call_later(0.1, gone.set)
    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize("stream,after_chunks,delay", [(True, 3, 0.01), (False, 0, 0.01), (True, 0, 30)],
                         ids=["mid-stream", "non-streaming", "before-first-token"])
async def test_client_disconnect_aborts_the_worker(tiny_model_dir, script, stream, after_chunks, delay):
    worker = FakeWorker(script, delay=delay, endless=True)
    ing = make_ingress(tiny_model_dir, worker)
    sent = await _call_then_disconnect(ing.http_app, _completion(max_tokens=4000, stream=stream), after_chunks)
    assert len(sent) == after_chunks
    await eventually(lambda: worker.aborted == [worker.calls[0][0]] and worker.closed == worker.aborted)
    assert worker.running == 0
    text = ing.metrics.exposition()[0].decode()
    assert f'moemesh:request_success_total{{finished_reason="abort",model_name="{MODEL}"}} 1.0' in text
    assert f'moemesh:ingress_requests_in_progress{{model_name="{MODEL}"}} 0.0' in text


# ---- metrics -------------------------------------------------------------------------------------------------------
async def test_metrics(tiny_model_dir, codec, script):
    ing = make_ingress(tiny_model_dir, FakeWorker(script))
    async with client(ing) as c:
        await c.post("/v1/completions", json=_completion(max_tokens=4))
        await c.post("/v1/completions", json=_completion(max_tokens=100, stream=True))
        await c.post("/v1/completions", json=_completion(temperature=-1))
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text, n_prompt, label = r.text, len(codec.encode(PROMPT)), f'model_name="{MODEL}"'
    for line in (f"moemesh:time_to_first_token_seconds_count{{{label}}} 2.0",
                 f"moemesh:time_per_output_token_seconds_count{{{label}}} 2.0",
                 f"moemesh:e2e_request_latency_seconds_count{{{label}}} 2.0",
                 f'moemesh:request_success_total{{finished_reason="length",{label}}} 1.0',
                 f'moemesh:request_success_total{{finished_reason="stop",{label}}} 1.0',
                 f'moemesh:request_errors_total{{code="invalid_value",{label},status="400"}} 1.0',
                 f"moemesh:prompt_tokens_total{{{label}}} {2.0 * n_prompt}",
                 f"moemesh:generation_tokens_total{{{label}}} {4.0 + len(script)}",
                 f"moemesh:ingress_requests_in_progress{{{label}}} 0.0"):
        assert line in text, line


async def test_openapi_documents_request_bodies(tiny_model_dir, script):
    async with client(make_ingress(tiny_model_dir, FakeWorker(script))) as c:
        spec = (await c.get("/openapi.json")).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "model" in schema["required"] and "$defs" not in json.dumps(schema)


# ---- with the real engine ------------------------------------------------------------------------------------------
async def test_http_tokens_equal_the_reference(tiny_model_dir, codec, engine_worker):
    """Concurrent greedy requests over HTTP to the in-process engine return what `generate` returns alone."""
    import torch

    import moemesh
    from moemesh.actors.attention.engine import AsyncEngine, Engine

    model = moemesh.load_model(tiny_model_dir)
    engine = AsyncEngine(Engine(model))
    prompts = ["The expert", "Mixture of experts routes every token", "a"]
    try:
        async with client(make_ingress(tiny_model_dir, engine_worker(engine))) as c:
            answers = await asyncio.gather(*(c.post("/v1/completions", json=_completion(
                prompt=p, max_tokens=10, temperature=0), timeout=60) for p in prompts))
    finally:
        await engine.shutdown()
    for prompt, r in zip(prompts, answers, strict=True):
        ids = codec.encode(prompt)
        expected = model.generate(torch.tensor([ids]), max_new_tokens=10)[0, len(ids):].tolist()
        assert r.json()["choices"][0]["text"] == codec.decode(expected)
        assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10, "total_tokens": len(ids) + 10,
                                     "prompt_tokens_details": {"cached_tokens": 0}}


async def test_stop_strings_cut_the_text_and_end_the_engine_sequence(tiny_model_dir, codec, engine_worker):
    """Stop strings are the ingress's (the one place that detokenizes): with the real engine behind it, the text
    ends before the stop string, finish_reason is "stop", the completion ends on the token that completed the stop
    string, and the engine's sequence is aborted (its KV memory freed)."""
    import torch

    import moemesh
    from moemesh.actors.attention.engine import AsyncEngine, CacheConfig, Engine

    model = moemesh.load_model(tiny_model_dir)
    engine = AsyncEngine(Engine(model, cache=CacheConfig(enable_prefix_caching=False)))  # cached prefixes hold blocks
    prompt = "The quick brown fox jumps over the lazy dog."
    body = _completion(prompt=prompt, max_tokens=40, temperature=0, ignore_eos=True)
    try:
        async with client(make_ingress(tiny_model_dir, engine_worker(engine))) as c:
            whole = (await c.post("/v1/completions", json=body, timeout=60)).json()
            text = whole["choices"][0]["text"]
            assert whole["choices"][0]["finish_reason"] == "length"
            i = next(i for i in range(8, len(text) - 3) if text[i:i + 3].isalpha() and text.find(text[i:i + 3]) == i)
            stop = text[i:i + 3]
            cut = (await c.post("/v1/completions", json={**body, "stop": ["no such text", stop]}, timeout=60)).json()
        ids = codec.encode(prompt)
        tokens = model.generate(torch.tensor([ids]), max_new_tokens=40, eos_token_id=None)[0, len(ids):].tolist()
        assert codec.decode(tokens) == text  # the deltas add up to the whole text
        assert cut["choices"][0]["text"] == text[:i] and cut["choices"][0]["finish_reason"] == "stop"
        first = next(t for t in range(1, len(tokens) + 1) if stop in codec.decode(tokens[:t]))
        assert cut["usage"]["completion_tokens"] >= first  # it reached the token that completed the stop string
        await eventually(lambda: engine.engine.kv.usage().used_blocks == 0, timeout=30)  # aborted: cache empty
    finally:
        await engine.shutdown()


# ---- over real HTTP (the `serve` fixture: conftest.py) ----------------------------------------------------------
@pytest.mark.anyio(False)
def test_openai_client(serve, tiny_model_dir, codec, script):
    import openai

    url = serve(make_ingress(tiny_model_dir, FakeWorker(script)).http_app)
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)
    assert [m.id for m in api.models.list()] == [MODEL]
    done = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert done.choices[0].text == codec.decode(script[:6]) and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 6 and done.usage.prompt_tokens == len(codec.encode(PROMPT))
    parts = [c.choices[0].text for c in api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100,
                                                               stream=True)]
    assert "".join(parts) == SCRIPT_TEXT
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.choices[0].message.content == codec.decode(script[:3]) and chat.choices[0].message.role == "assistant"
    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SCRIPT_TEXT
    assert chunks[-1].usage.completion_tokens == len(script)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=-1)


@pytest.mark.anyio(False)
def test_disconnect_over_real_http(serve, tiny_model_dir, script):
    worker = FakeWorker(script, delay=0.01, endless=True)
    url = serve(make_ingress(tiny_model_dir, worker).http_app)
    with httpx.stream("POST", url + "/v1/completions", json=_completion(max_tokens=4000, stream=True),
                      timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
    for _ in range(300):  # the client closed the connection: the worker's sequence is aborted
        if worker.aborted and worker.closed:
            break
        threading.Event().wait(0.01)
    assert worker.aborted == [worker.calls[0][0]] == worker.closed
