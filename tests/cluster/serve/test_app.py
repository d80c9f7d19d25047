"""The disaggregated runtime on a 3-node Ray cluster, over real HTTP: exact tokens, the OpenAI client, continuous
batching, placement. (Fixtures in conftest.py: one cluster and one deployment per session.)"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch
from tokenizers import Tokenizer

import moemesh

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


def test_concurrent_requests_return_exactly_the_reference_tokens(served, reference):
    url, _, _ = served
    g = torch.Generator().manual_seed(42)
    lengths = [1, 7, 33, 64, 120, 200, 257, 310]
    prompts = [torch.randint(3, reference.config.vocab_size, (n,), generator=g).tolist() for n in lengths]

    async def one(client, prompt):
        r = await client.post(f"{url}/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                           "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()

    async def all_at_once():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    bodies = asyncio.run(all_at_once())
    decode = Tokenizer.from_file(f"{served[1].model}/tokenizer.json").decode
    for prompt, body in zip(prompts, bodies):
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=None)[0, len(prompt):]
        cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]  # the worker's prefix cache
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 10,
                                 "total_tokens": len(prompt) + 10} and 0 <= cached < len(prompt)
        assert body["choices"][0]["text"] == decode(want.tolist(), skip_special_tokens=True)


def test_openai_client_unchanged(served):
    from openai import OpenAI

    url, _, _ = served
    client = OpenAI(base_url=url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="The expert shard", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The expert shard", max_tokens=6, temperature=0, stream=True))
    assert done.choices[0].text == streamed and done.usage.completion_tokens == 6
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True))
    assert chat.choices[0].message.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("length", "stop")


def test_logprobs_and_penalties_cross_the_cluster(served, reference):
    """Logprobs (echo with max_tokens 0, and streamed chat) and penalties travel ingress -> Serve -> worker and back:
    prompt logprobs equal the model's alone (float64) to 2e-5; a logit_bias of 100 forces its token."""
    from openai import OpenAI

    url, _, _ = served
    client = OpenAI(base_url=url, api_key="unused")
    prompt = [5, 77, 300, 41, 9, 128, 64]
    echo = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    want = torch.log_softmax(reference.forward(torch.tensor([prompt]))[0].double(), dim=-1)
    got = echo.choices[0].logprobs.token_logprobs
    assert got[0] is None and got[1:] == pytest.approx([float(want[p, prompt[p + 1]]) for p in range(6)], abs=2e-5)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=1,
        logit_bias={"300": 100}, frequency_penalty=1.0, stream=True, extra_body={"ignore_eos": True}))
    entries = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert len(entries) == 4 and all(e.top_logprobs[0].token == e.token for e in entries)
    assert {bytes(e.bytes) for e in entries} == {bytes(entries[0].bytes)}  # token 300, four times


def test_continuous_batching_short_request_overtakes_long_one(served):
    from ray import serve

    url, config, _ = served
    workers = [serve.get_deployment_handle(f"attention-worker-{k}", app_name="moemesh")
               for k in range(config.attention.replicas)]

    async def timed(client, max_tokens):
        r = await client.post(f"{url}/completions", json={"model": "tiny", "prompt": [5, 6, 7],
                                                           "max_tokens": max_tokens, "temperature": 0,
                                                           "ignore_eos": True})
        assert r.status_code == 200
        return time.monotonic()

    async def every_rank_running_a_sequence(timeout_s: float = 120.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all([(await w.stats.remote())["engine"]["num_running"] for w in workers]):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for a long request running on every rank")

    async def all_three():
        # one long request per rank, then a short one: it lands on a busy rank and must join its running batch
        # (not wait for the long request there to finish)
        async with httpx.AsyncClient(timeout=300) as client:
            longs = [asyncio.create_task(timed(client, 150)) for _ in workers]
            await every_rank_running_a_sequence()
            short = await timed(client, 3)
            return await asyncio.gather(*longs), short

    longs, short = asyncio.run(all_three())
    assert short < min(longs)


def test_every_actor_ran_where_the_config_placed_it(served):
    from ray import serve

    _, config, node_ids = served
    expected = {"attention-worker-0": "head_node", "attention-worker-1": "head_node",
                "expert-shard-0": "expert_node", "expert-shard-1": "expert_node", "expert-shard-2": "expert_node",
                "engram-shard-0-0": "engram_node", "engram-shard-1-0": "engram_node"}
    for deployment, marker in expected.items():
        handle = serve.get_deployment_handle(deployment, app_name="moemesh")
        assert handle.node_id.remote().result(timeout_s=60) == node_ids[marker], deployment


def test_every_role_exports_prometheus_metrics(served):
    url, _, _ = served
    base = url.removesuffix("/v1")
    httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "metrics please", "max_tokens": 4},
               timeout=120).raise_for_status()
    targets = httpx.get(f"{base}/metrics/targets", timeout=60).json()
    by_role = {t["labels"]["deployment"]: t["targets"][0] for t in targets}
    assert sorted(by_role) == ["attention-worker-0", "attention-worker-1", "engram-shard-0-0", "engram-shard-1-0",
                               "expert-shard-0", "expert-shard-1", "expert-shard-2"]
    scraped = {role: httpx.get(f"http://{addr}/metrics", timeout=30).text for role, addr in by_role.items()}
    workers = scraped["attention-worker-0"] + scraped["attention-worker-1"]
    for name in ("moemesh:num_requests_running", "moemesh:kv_cache_usage_perc", "moemesh:expert_tokens_total",
                 "moemesh:dispatch_bytes_total", "moemesh:engram_cache_hits_total", "moemesh:engram_lookup_seconds",
                 "process_resident_memory_bytes"):
        assert name in workers, name
    assert all("moemesh:shard_expert_tokens_total{" in scraped[f"expert-shard-{i}"] for i in range(3))
    assert "moemesh:engram_shard_rows_total" in scraped["engram-shard-0-0"]
    ingress = httpx.get(f"{base}/metrics", timeout=30).text
    assert "moemesh:time_to_first_token_seconds_bucket" in ingress and "moemesh:request_success_total{" in ingress


def test_a_client_leaving_mid_stream_frees_its_sequence(served):
    from ray import serve

    url, config, _ = served
    workers = [serve.get_deployment_handle(f"attention-worker-{k}", app_name="moemesh")
               for k in range(config.attention.replicas)]

    def busy() -> list[tuple[int, int]]:
        """Per worker (sequences running or waiting, state slots held): a sequence holds a slot while admitted. Its
        blocks are not counted: with the prefix cache on (the default) the prompt's blocks stay cached for later
        requests once the sequence is gone, until evicted."""
        stats = [w.stats.remote().result(timeout_s=60)["engine"] for w in workers]
        return [(s["num_running"] + s["num_waiting"], s["kv_cache"]["used_slots"]) for s in stats]

    body = {"model": "tiny", "prompt": list(range(3, 203)), "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                assert any(n > 0 and slots > 0 for n, slots in busy())  # generating, holding its state
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 60
    while busy() != [(0, 0)] * len(workers) and time.monotonic() < deadline:  # a condition wait, bounded
        time.sleep(0.2)
    assert busy() == [(0, 0)] * len(workers)


def test_shards_refuse_calls_without_the_cluster_token(served):
    """The builder generated a cluster token: requests above got through (workers carry it); a caller without it is
    refused by every shard before anything runs."""
    import grpc
    from ray import serve

    from moemesh.proto import health_pb2, health_pb2_grpc

    for deployment in ("expert-shard-0", "engram-shard-0-0"):
        address = serve.get_deployment_handle(deployment, app_name="moemesh").grpc_address.remote().result(
            timeout_s=60)
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, deployment
