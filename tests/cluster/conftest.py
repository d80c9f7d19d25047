"""One real multi-node Ray cluster (and one moemesh deployment on it) per test session.

`ray.cluster_utils.Cluster` starts three Ray nodes on this machine standing in for three hosts; custom resources mark
them (`head_node`, `expert_node`, `engram_node`) and the deployment config pins roles to them. Each node also carries
its pin resource `moemesh.io/node:<marker>` and the worker nodes logical NPUs (expert_node 2, engram_node 1) that
nothing asks for: the devices a plan is made for (tests/cluster/serve/test_pinning.py). Never `ray stop`:
everything started here is stopped with `serve.shutdown()` / `Cluster.shutdown()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time

import httpx
import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")  # token auth: tests/conftest.py
    import ray
    from ray.cluster_utils import Cluster

    def pin(name: str) -> dict:  # each node's own resource, what cluster/serve/pinning.py pins processes with
        return {f"moemesh.io/node:{name}": 1}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6,
                                                            "resources": {"head_node": 100, **pin("head")}})
    nodes = {"head_node": cluster.head_node,
             "expert_node": cluster.add_node(num_cpus=6, resources={"expert_node": 100, "NPU": 2, **pin("expert")}),
             "engram_node": cluster.add_node(num_cpus=6, resources={"engram_node": 100, "NPU": 1, **pin("engram")})}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="moemesh-tests")
    yield cluster, {name: node.node_id for name, node in nodes.items()}
    ray.shutdown()
    cluster.shutdown()


SERVE_CONFIG = {
    "attention": {"replicas": 2, "max_num_seqs": 8, "kv_cache_blocks": 2048, "block_size": 16,
                  "placement": {"num_cpus": 1, "resources": {"head_node": 1}}},
    "experts": {"shards": 3, "placement": {"num_cpus": 0.5, "resources": {"expert_node": 1}}},
    "engram": {"shards": 2, "placement": {"num_cpus": 0.5, "resources": {"engram_node": 1}}},
    "ingress": {"model_name": "tiny"},
}


@pytest.fixture(scope="session")
def served(ray_cluster, tiny_model_dir):
    """The tiny model deployed on the cluster: (base URL, DeploymentConfig, node ids by marker)."""
    from ray import serve

    from moemesh.cluster.serve.app import deploy
    from moemesh.cluster.config import DeploymentConfig

    _, node_ids = ray_cluster
    port = _free_port()
    config = DeploymentConfig.from_dict({**SERVE_CONFIG, "model": str(tiny_model_dir),
                                         "ingress": {**SERVE_CONFIG["ingress"], "port": port}})
    url = deploy(config)
    yield url, config, node_ids
    serve.shutdown()


@pytest.fixture(scope="session")
def side_app(served, tiny_model_dir):
    """`with side_app(name, config) as url:` a second application `name` (a deployment config dict, on the tiny
    model) on the session's cluster and Serve, beside the `moemesh` app, at route `/name`: its API base URL. Deleted
    on exit, so what a test does to it (kills, scaling) disturbs no other test."""
    from ray import serve

    from moemesh.cluster.serve.app import build_app
    from moemesh.cluster.config import DeploymentConfig

    @contextlib.contextmanager
    def run(name: str, config: dict):
        serve.run(build_app(DeploymentConfig.from_dict({**config, "model": str(tiny_model_dir)})), name=name,
                  route_prefix=f"/{name}")
        try:
            yield served[0].removesuffix("/v1") + f"/{name}/v1"
        finally:
            serve.delete(name)
    return run


class Reference:
    """The tiny model run in this process: the exact text every served answer must equal."""

    def __init__(self, model_dir):
        from tokenizers import Tokenizer

        import moemesh

        self.model = moemesh.load_model(model_dir)
        self.vocab_size = self.model.config.vocab_size
        self._decode = Tokenizer.from_file(f"{model_dir}/tokenizer.json").decode

    def prompts(self, seed: int, lengths=(2, 5, 9, 17), low: int = 3, high: int | None = None) -> list[list[int]]:
        """Random prompts of `lengths` tokens drawn from [low, high) (default: the vocabulary past 3 specials)."""
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(low, high or self.vocab_size, (n,), generator=g).tolist() for n in lengths]

    def texts(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        """Each prompt's greedy completion of exactly `max_tokens` tokens (no EOS stop), decoded as the API does."""
        return [self._decode(self.model.generate(torch.tensor([p]), max_new_tokens=max_tokens, eos_token_id=None)
                             [0, len(p):].tolist(), skip_special_tokens=True) for p in prompts]


@pytest.fixture(scope="session")
def reference(tiny_model_dir) -> Reference:
    """`Reference` over the tiny model: `.prompts(seed, ...)`, `.texts(prompts, max_tokens)`."""
    return Reference(tiny_model_dir)


def _wait_until(what: str, probe, timeout_s: float = 180.0, every_s: float = 0.2):
    """Poll `probe()` every `every_s` until it returns something truthy (bounded by `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


class HttpLoad:
    """`concurrency` clients on a thread of their own, each sending requests back to back until stopped; every
    answer (or failure) is kept. A few clients stream."""

    def __init__(self, url: str, prompts: list[list[int]], concurrency: int = 32, max_tokens: int = 12):
        self.url, self.prompts, self.concurrency, self.max_tokens = url, prompts, concurrency, max_tokens
        self.results: list[tuple[int, int, str]] = []  # (prompt index, HTTP status or -1, text or error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> "HttpLoad":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 300.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the load did not finish in time"

    def check(self, expected: list[str]) -> None:
        """Every request answered (HTTP 200) with exactly `expected[its prompt index]`."""
        failed = [(p, status, text[:300]) for p, status, text in self.results if status != 200]
        assert not failed, failed[:5]
        wrong = [(p, text, expected[p]) for p, _, text in self.results if text != expected[p]]
        assert not wrong, wrong[:5]

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(*(self._client(client, c) for c in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient, c: int) -> None:
        i = c
        while not self._stop.is_set():
            p = i % len(self.prompts)
            body = {"model": "tiny", "prompt": self.prompts[p], "max_tokens": self.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": c % 8 == 0}
            try:
                self.results.append((p, *(await (self._stream if body["stream"] else self._once)(client, body))))
            except Exception as e:  # noqa: BLE001 - recorded as a failure
                self.results.append((p, -1, repr(e)))
            i += self.concurrency

    async def _once(self, client, body) -> tuple[int, str]:
        r = await client.post(f"{self.url}/completions", json=body)
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    async def _stream(self, client, body) -> tuple[int, str]:
        text = []
        async with client.stream("POST", f"{self.url}/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        return 599, json.dumps(event)
                    text += [c["text"] for c in event["choices"]]
        return r.status_code, "".join(text)


@pytest.fixture(scope="session")
def wait_until():
    """`wait_until(what, probe, timeout_s=180, every_s=0.2)`: poll until `probe()` is truthy -> its value."""
    return _wait_until


@pytest.fixture(scope="session")
def http_load():
    """`http_load(url, prompts, concurrency=32, max_tokens=12).start()`: steady greedy completions (some
    streamed) until `.stop()`; `.results` holds (prompt index, status or -1, text or error) of every request;
    `.check(expected)` asserts each was answered with its expected text."""
    return HttpLoad
