"""The ingress's gate: API keys (401 in OpenAI's shape without a right one, open paths stay open, keys never in logs
or answers), per-key concurrency and in-flight back-pressure (429 with Retry-After, freed when a request ends), and
429 when every worker reports a full queue. In process, over httpx's ASGI transport, with fake workers."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from moemesh.actors.ingress.app import Ingress
from moemesh.actors.ingress.gate import ApiKeys
from moemesh.actors.ingress.metrics import Metrics
from moemesh.actors.ingress.protocol import IngressLimits, OpenAIError
from moemesh.actors.request import Delta

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
KEY_A, KEY_B = "sk-alpha-0123456789abcdefXYZ", "sk-bravo-9876543210fedcbaQRS"
BODY = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4}


@pytest.fixture
def anyio_backend():
    return "asyncio"


class SlowWorker:
    """Emits token 9 every `delay` seconds until max_tokens; `load_base` is its reported queue depth."""

    def __init__(self, delay: float = 0.0, load_base: float = 0.0):
        self.delay, self.load_base = delay, load_base

    async def generate(self, request_id, prompt_token_ids, params):
        for i in range(params.max_tokens):
            await asyncio.sleep(self.delay)  # time under test: a slow worker, so requests stay in flight a while
            yield Delta([9], "length" if i + 1 == params.max_tokens else None)

    async def load(self) -> float:
        return self.load_base

    async def abort(self, request_id: str) -> None:
        pass


def make(model_dir, worker=None, keys=(KEY_A, KEY_B), public_metrics=False, **limits) -> Ingress:
    return Ingress.from_checkpoint(model_dir, [worker or SlowWorker()], model_name="tiny",
                                   limits=IngressLimits(**limits), metrics=Metrics(process_collectors=False),
                                   api_keys=keys, public_metrics=public_metrics)


def client(ingress: Ingress) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(ingress.http_app), base_url="http://ingress")


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


# ---- API keys -------------------------------------------------------------------------------------------------------
async def test_v1_needs_a_right_key_and_open_paths_stay_open(tiny_model_dir):
    async with client(make(tiny_model_dir)) as c:
        assert_openai_error(await c.get("/v1/models"), 401, "missing_api_key")
        for headers in (bearer("sk-wrong-0123456789abcdefXYZ"), bearer(KEY_A[:-1]), bearer(KEY_A + "x"),
                        {"Authorization": f"Basic {KEY_A}"}, {"Authorization": KEY_A}, bearer("")):
            r = await c.get("/v1/models", headers=headers)
            assert_openai_error(r, 401, "invalid_api_key")
            assert r.headers["WWW-Authenticate"] == "Bearer"
        twice = httpx.Headers([("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {KEY_A}")])
        assert (await c.get("/v1/models", headers=twice)).status_code == 401
        assert_openai_error(await c.post("/v1/completions", json=BODY), 401, "missing_api_key")
        assert_openai_error(await c.get("/v1/no-such-path"), 401, "missing_api_key")  # 401 before routing
        for key in (KEY_A, KEY_B):
            assert (await c.get("/v1/models", headers=bearer(key))).status_code == 200
            assert (await c.post("/v1/completions", json=BODY, headers=bearer(key))).status_code == 200
        assert (await c.get("/v1/models", headers={"authorization": f"bearer  {KEY_B} "})).status_code == 200
        assert (await c.get("/v1/no-such-path", headers=bearer(KEY_A))).status_code == 404
        for path in ("/health", "/openapi.json", "/docs"):
            assert (await c.get(path)).status_code == 200, path


async def test_metrics_need_a_key_unless_public(tiny_model_dir):
    async with client(make(tiny_model_dir)) as c:
        assert_openai_error(await c.get("/metrics"), 401, "missing_api_key")
        assert (await c.get("/metrics", headers=bearer(KEY_A))).status_code == 200
    async with client(make(tiny_model_dir, public_metrics=True)) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert_openai_error(await c.get("/v1/models"), 401, "missing_api_key")


async def test_no_keys_means_an_open_api(tiny_model_dir):
    async with client(make(tiny_model_dir, keys=())) as c:
        assert (await c.get("/v1/models")).status_code == 200
        assert (await c.post("/v1/completions", json=BODY, headers=bearer("anything-at-all-here"))).status_code == 200


async def test_keys_never_reach_logs_answers_or_metrics(tiny_model_dir, caplog):
    class Failing(SlowWorker):
        async def generate(self, request_id, prompt_token_ids, params):
            raise RuntimeError("worker exploded")
            yield

    caplog.set_level(logging.DEBUG)
    texts = []
    for worker in (SlowWorker(), Failing()):
        ing = make(tiny_model_dir, worker)
        async with client(ing) as c:
            for headers in (bearer(KEY_A), bearer(KEY_B + "-wrong"), {"Authorization": f"Basic {KEY_B}"}):
                for r in (await c.post("/v1/completions", json=BODY, headers=headers),
                          await c.post("/v1/chat/completions", headers=headers,
                                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
                          await c.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers),
                          await c.get("/v1/models/other", headers=headers)):
                    texts.append(r.text + str(r.headers))
            texts.append((await c.get("/metrics", headers=bearer(KEY_A))).text)
    assert any("worker exploded" in r.getMessage() for r in caplog.records)  # the logs were captured
    everything = caplog.text + "".join(texts)
    for key in (KEY_A, KEY_B):
        assert key not in everything and key[:12] not in everything


def test_api_keys_compare_against_every_key():
    keys = ApiKeys([KEY_A, KEY_B, KEY_A])
    assert keys.enabled and not ApiKeys().enabled
    assert keys.identify(f"Bearer {KEY_A}") == 0 and keys.identify(f"Bearer {KEY_B}") == 1
    with pytest.raises(OpenAIError) as info:
        keys.identify(f"Bearer {KEY_B[:-1]}")
    assert info.value.status == 401 and KEY_B[:-1] not in info.value.message


# ---- limits ---------------------------------------------------------------------------------------------------------
async def _until(what: str, condition, timeout_s: float = 30.0) -> None:
    """Poll `condition()` every 10 ms until it holds (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.01)


async def _hold(c: httpx.AsyncClient, key: str | None, n: int, ing: Ingress) -> list[asyncio.Task]:
    """Start `n` slow requests of `key` and wait until the gate counts them all in flight."""
    before = ing.admission.in_flight
    headers = bearer(key) if key else {}
    tasks = [asyncio.create_task(c.post("/v1/completions", json={**BODY, "max_tokens": 20}, headers=headers))
             for _ in range(n)]
    await _until("the requests to start", lambda: ing.admission.in_flight == before + n)
    return tasks


async def test_concurrent_requests_per_key_are_limited(tiny_model_dir):
    ing = make(tiny_model_dir, SlowWorker(delay=0.05), max_concurrent_per_key=2, retry_after_s=3)
    async with client(ing) as c:
        held = await _hold(c, KEY_A, 2, ing)
        r = await c.post("/v1/completions", json=BODY, headers=bearer(KEY_A))
        err = assert_openai_error(r, 429, "rate_limit_exceeded")
        assert r.headers["Retry-After"] == "3" and err["type"] == "rate_limit_error"
        assert (await c.get("/v1/models", headers=bearer(KEY_A))).status_code == 200  # only generation is limited
        assert (await c.post("/v1/completions", json=BODY, headers=bearer(KEY_B))).status_code == 200
        assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200]
        assert (await c.post("/v1/completions", json=BODY, headers=bearer(KEY_A))).status_code == 200
    assert ing.admission.in_flight == 0 and not ing.admission.per_key


async def test_in_flight_above_the_maximum_gets_429_not_a_queue(tiny_model_dir):
    ing = make(tiny_model_dir, SlowWorker(delay=0.05), keys=(), max_in_flight=3)
    async with client(ing) as c:
        held = await _hold(c, None, 3, ing)
        for path, body in (("/v1/completions", BODY),
                           ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})):
            r = await c.post(path, json=body)
            assert_openai_error(r, 429, "server_busy")
            assert r.headers["Retry-After"] == "1"
        assert (await c.get("/health")).status_code == 200
        assert [t.status_code for t in await asyncio.gather(*held)] == [200] * 3
        assert (await c.post("/v1/completions", json=BODY)).status_code == 200
        metrics = (await c.get("/metrics")).text
    assert 'moemesh:request_errors_total{code="server_busy",model_name="tiny",status="429"} 2.0' in metrics
    assert ing.admission.in_flight == 0


async def test_streams_hold_their_slot_until_the_last_event(tiny_model_dir):
    ing = make(tiny_model_dir, SlowWorker(delay=0.02), keys=(), max_in_flight=1)
    async with client(ing) as c:
        first = asyncio.create_task(c.post("/v1/completions", json={**BODY, "max_tokens": 10, "stream": True}))
        await _until("the stream to start", lambda: ing.admission.in_flight == 1)
        assert (await c.post("/v1/completions", json=BODY)).status_code == 429
        assert (await first).text.endswith("data: [DONE]\n\n")
    assert ing.admission.in_flight == 0


async def test_full_workers_get_429(tiny_model_dir):
    async with client(make(tiny_model_dir, SlowWorker(load_base=8), keys=(), max_worker_load=8)) as c:
        r = await c.post("/v1/completions", json=BODY)
        assert_openai_error(r, 429, "workers_full")
        assert r.headers["Retry-After"] == "1"
    async with client(make(tiny_model_dir, SlowWorker(load_base=7), keys=(), max_worker_load=8)) as c:
        assert (await c.post("/v1/completions", json=BODY)).status_code == 200
