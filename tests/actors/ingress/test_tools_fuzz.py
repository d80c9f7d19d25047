"""Fuzzing the tool fields over HTTP (in process): random `tools`, `tool_choice`, `parallel_tool_calls` and
assistant `tool_calls` in the history, answered by a worker that streams a random mix of tool-call markup tokens,
function names and text tokens of the tiny tokenizer. No answer may be a 5xx, every error is OpenAI's error JSON
naming a field, and no markup token ever reaches `content` when the request parses calls. Bounded and repeatable
(derandomized, no example database)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moemesh.actors.ingress.app import Ingress
from moemesh.actors.ingress.metrics import Metrics
from moemesh.actors.request import Delta
from moemesh.kernels.chat_format import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

pytestmark = pytest.mark.timeout(300)
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP)


class ScriptedWorker:
    """Streams `script` (token ids), a few per delta, then stops (or is cut by max_tokens)."""

    script: list[int] = []

    async def generate(self, request_id, prompt_token_ids, params):
        ids = self.script[:params.max_tokens]
        for i in range(0, max(len(ids), 1), 3):
            last = i + 3 >= len(ids)
            yield Delta(ids[i:i + 3], ("length" if len(self.script) > params.max_tokens else "stop") if last else None)

    async def load(self) -> float:
        return 0.0

    async def abort(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    worker = ScriptedWorker()
    ingress = Ingress.from_checkpoint(tiny_model_dir, [worker], model_name="tiny",
                                      metrics=Metrics(process_collectors=False))
    return TestClient(ingress.http_app), worker, ingress.codec


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
NAMES = st.sampled_from(["add", "get_weather", "a b", "", "x" * 70])
SCHEMAS = st.sampled_from([{"type": "object", "properties": {"a": {"type": "integer"}}}, {"type": "objectt"},
                           {"type": "string", "multipleOf": 2}, {}, [1], "x", {"type": "object"}]) | JSON
FUNCTION = st.fixed_dictionaries({"name": NAMES}, optional={"description": st.text(max_size=8) | JSON,
                                                             "parameters": SCHEMAS})
TOOL = st.fixed_dictionaries({"type": st.sampled_from(["function", "other"]), "function": FUNCTION | JSON})
CHOICE = st.sampled_from(["auto", "none", "required", "any"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": NAMES})}) | JSON
VALID_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
               for n in ("add", "get_weather")]
CALL = CALLS_BEGIN + CALL_BEGIN + "add" + TOOL_SEP + '{"a": 1}' + CALL_END
HISTORY_CALL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": NAMES, "arguments": st.text(max_size=10) | JSON})})


@st.composite
def bodies(draw):
    body = {"model": "tiny", "max_tokens": draw(st.integers(1, 40)), "stream": draw(st.booleans()),
            "messages": [{"role": "user", "content": "hi"}]}
    if draw(st.booleans()):
        body["messages"] += [{"role": draw(st.sampled_from(["assistant", "user"])), "content": None,
                              "tool_calls": draw(st.lists(HISTORY_CALL, max_size=2))},
                             {"role": "tool", "content": draw(st.text(max_size=10)), "tool_call_id": "c"}]
    for key, strategy in (("tools", st.just(VALID_TOOLS) | st.lists(TOOL, max_size=3) | JSON), ("tool_choice", CHOICE),
                          ("parallel_tool_calls", st.booleans() | JSON)):
        if draw(st.booleans()):
            body[key] = draw(strategy)
    return body


@given(body=bodies(), pieces=st.lists(st.sampled_from(MARKERS + (CALL, CALL, "add", "get_weather", '{"a": 1}',
                                                                 " hi", "<｜")), max_size=12))
@settings(max_examples=150, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_tool_input_gets_a_server_error(app, body, pieces):
    """And for a request that is answered: streamed and whole answers agree (content, calls, finish_reason), and no
    well-formed call to one of the request's functions is left in content."""
    client, worker, codec = app
    worker.script = codec.tokenizer.encode("".join(pieces), add_special_tokens=False).ids
    answers = []
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json={**body, "stream": stream})
        assert response.status_code < 500, response.text
        if response.status_code != 200:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            return
        answers.append(_streamed(response) if stream else _whole(response))
    assert answers[0] == answers[1]
    content, calls, _ = answers[0]
    names = {t["function"]["name"] for t in body.get("tools") or []} if calls else set()
    assert not any(CALLS_BEGIN + CALL_BEGIN + name + TOOL_SEP in content for name in names)


def _whole(response) -> tuple[str, list[tuple[str, str]], str]:
    choice = response.json()["choices"][0]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls") or []]
    return choice["message"]["content"] or "", calls, choice["finish_reason"]


def _streamed(response) -> tuple[str, list[tuple[str, str]], str]:
    content, calls, finish = "", [], None
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            content += choice["delta"].get("content") or ""
            for d in choice["delta"].get("tool_calls") or []:
                if "id" in d:
                    calls.append([d["function"]["name"], ""])
                else:
                    calls[d["index"]][1] += d["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    return content, [tuple(c) for c in calls], finish
