"""Prefix caching seen through the HTTP API: the official `openai` client against two real uvicorn servers, one over
an engine with the prefix cache (the default) and one without, both on `tiny`. A later request sharing a long prefix
with an earlier one reports `usage.prompt_tokens_details.cached_tokens` > 0 and answers exactly as the uncached
server does (greedy)."""

from __future__ import annotations

import pytest

import moemesh
from moemesh.actors.attention.engine import AsyncEngine, CacheConfig, Engine
from moemesh.actors.ingress.app import Ingress
from moemesh.actors.ingress.metrics import Metrics

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny"
SYSTEM = "You are a careful assistant of the expert mesh. " * 24  # a shared prefix of some hundreds of tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


def _client(serve, tiny_model_dir, model, engine_worker, prefix_caching: bool):
    import openai

    engine = AsyncEngine(Engine(model, cache=CacheConfig(enable_prefix_caching=prefix_caching)))
    ingress = Ingress.from_checkpoint(tiny_model_dir, [engine_worker(engine)], model_name=MODEL,
                                      metrics=Metrics(process_collectors=False))
    return openai.OpenAI(base_url=serve(ingress.http_app) + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def apis(serve, tiny_model_dir, model, engine_worker):
    """{True: client of the server with the prefix cache, False: without}."""
    return {on: _client(serve, tiny_model_dir, model, engine_worker, on) for on in (True, False)}


def _chat(api, messages):
    r = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    return r.choices[0].message.content, r.usage


def test_chat_second_turn_reports_cached_tokens_and_the_uncached_answer(apis):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name one expert."}]
    results = {}
    for on, api in apis.items():
        text1, usage1 = _chat(api, first)
        turn2 = first + [{"role": "assistant", "content": text1}, {"role": "user", "content": "And another?"}]
        text2, usage2 = _chat(api, turn2)
        results[on] = (text1, text2, usage1, usage2)
    on, off = results[True], results[False]
    assert on[:2] == off[:2]  # same answers with and without the cache
    assert on[2].prompt_tokens_details.cached_tokens == 0  # nothing cached before the first request
    cached = on[3].prompt_tokens_details.cached_tokens
    assert on[2].prompt_tokens > 64 and 64 <= cached < on[3].prompt_tokens and cached % 64 == 0
    assert off[3].prompt_tokens_details.cached_tokens == 0
    assert on[3].prompt_tokens == off[3].prompt_tokens


def test_streamed_completions_report_cached_tokens_in_the_usage_chunk(apis):
    texts, usages = {}, {}
    for on, api in apis.items():
        for i, question in enumerate(("Q: what is routed?\nA:", "Q: what is shared?\nA:")):
            stream = api.completions.create(model=MODEL, prompt=SYSTEM + question, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
            texts[on, i] = "".join(c.choices[0].text for c in chunks if c.choices)
            usages[on, i] = chunks[-1].usage
    assert texts[True, 0] == texts[False, 0] and texts[True, 1] == texts[False, 1]
    assert usages[True, 1].prompt_tokens_details.cached_tokens >= 64  # the system text, computed for request 0
    assert usages[False, 1].prompt_tokens_details.cached_tokens == 0
    assert usages[True, 1].prompt_tokens == usages[False, 1].prompt_tokens
