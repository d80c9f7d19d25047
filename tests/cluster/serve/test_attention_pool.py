"""The attention pool (`attention.autoscaling`, docs/serving.md): extra ranks that Serve's autoscaler adds and removes
with moemesh's policy (cluster/serve/pool_policy.py).

First without Ray: the config block, the ingress's `PoolWorker` over a fake handle, a pool replica following the
expert controller's map. Then live on the session's 3-node cluster, in an app (`pool`) beside the main one with one
fixed rank and a pool of 0..2: a request cold-starts the empty pool and a cancelled stream frees its sequence there;
the idle pool goes back to zero; concurrent HTTP load fills the fixed rank, spills to the pool and grows it to 2,
every answer equal to the single-process reference; after the load the pool returns to zero.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from moemesh.actors.ingress.generation import ElasticWorker
from moemesh.actors.request import RequestParams
from moemesh.cluster.config import ConfigFileError, DeploymentConfig

# ---- the config block ------------------------------------------------------------------------------------------------


def test_pool_config_defaults_and_target():
    config = DeploymentConfig.from_dict({"attention": {"max_num_seqs": 8, "autoscaling": {}}})
    auto = config.attention.autoscaling
    assert (auto.min_replicas, auto.max_replicas, auto.target_ttft_s) == (0, 4, None)
    assert config.attention.target_queue() == 8.0  # None: one full batch per rank
    config = DeploymentConfig.from_dict({"attention": {"autoscaling": {"target_queue_per_replica": 3}}})
    assert config.attention.target_queue() == 3.0
    assert DeploymentConfig.from_dict({}).attention.autoscaling is None


@pytest.mark.parametrize("block, needle", [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas (3) must not exceed max_replicas (2)"),
    ({"max_replicas": 0}, "attention.autoscaling.max_replicas"),
    ({"target_queue_per_replica": 0}, "got 0"),
    ({"target_ttft_s": -1}, "attention.autoscaling.target_ttft_s"),
    ({"look_back_period_s": 0}, "look_back_period_s"),
    ({"upscale_delay": 1}, "upscale_delay"),
])
def test_bad_pool_configs_name_the_field_and_value(block, needle):
    with pytest.raises(ConfigFileError) as err:
        DeploymentConfig.from_dict({"attention": {"autoscaling": block}})
    assert needle in str(err.value)


def test_the_builder_gives_serve_the_policy_and_the_bounds(tiny_model_dir):
    from moemesh.cluster.names import ATTENTION_POOL as POOL
    from moemesh.cluster.serve.app import STATS_PUSH_ENV, _attention_pool, required_cpus

    config = DeploymentConfig.from_dict({"model": str(tiny_model_dir), "attention": {
        "replicas": 2, "max_num_seqs": 4, "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ttft_s": 2,
                                                          "look_back_period_s": 12, "drain_timeout_s": 45}}})
    app = _attention_pool(config, (), None)
    d = app._bound_deployment
    auto = d._deployment_config.autoscaling_config
    assert d.name == POOL and (auto.min_replicas, auto.max_replicas, auto.look_back_period_s) == (1, 3, 12)
    assert auto.policy.policy_kwargs == {"target_queue_per_replica": 4.0, "target_ttft_s": 2.0}
    assert d._deployment_config.graceful_shutdown_timeout_s == 45
    assert d.ray_actor_options["runtime_env"]["env_vars"][STATS_PUSH_ENV] == "6.0"
    assert required_cpus(config) == pytest.approx((2 + 3) * 1.0 + 2 * 1.0 + 2 * 1.0 + 0.5)


# ---- the ingress's PoolWorker over a fake handle ---------------------------------------------------------------------
async def _until(what: str, condition, timeout_s: float = 10.0) -> None:
    """Let the loop run until `condition()` holds (bounded): other tasks reach the point a test needs."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.001)


class FakeStream:
    def __init__(self, deltas):
        self.deltas, self.cancelled = list(deltas), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.deltas:
            raise StopAsyncIteration
        await asyncio.sleep(0)  # a yield only: each delta arrives on a later turn of the loop, as from a real stream
        return self.deltas.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """`handle.options(stream=True).generate.remote(...)` and `handle.<method>.remote(...)`, recorded."""

    def __init__(self, tokens: int = 5):
        self.calls: list[str] = []
        self.streams: list[FakeStream] = []
        self.tokens, self.started = tokens, asyncio.Event()

    def options(self, stream: bool = False):
        return self

    def __getattr__(self, method):
        handle = self

        class Method:
            def remote(self, *args):
                handle.calls.append(method)
                if method == "generate":
                    handle.streams.append(FakeStream({"token_ids": [i]} for i in range(handle.tokens)))
                    return handle.streams[-1]
                return handle._answer()
        return Method()

    async def _answer(self):
        await self.started.wait()  # a call to an empty pool waits for a replica
        return 0.0


def test_pool_worker_counts_its_sequences_and_never_sends_an_abort():
    from moemesh.cluster.serve.ingress import PoolWorker

    async def run():
        handle, counts = FakeHandle(), []

        async def count():
            counts.append(1)
            return 2
        worker = PoolWorker(handle, spill_at=4, count=count)
        assert isinstance(worker, ElasticWorker) and worker.replicas() == 0  # first ask starts a read
        await _until("the first read", lambda: worker.replicas() == 2)
        assert len(counts) == 1  # re-read at most every refresh_s
        params = RequestParams(max_tokens=5)
        streams = [worker.generate(f"r{i}", [1], params) for i in range(3)]
        for s in streams:
            await anext(s)
        assert await worker.load() == 1.5  # 3 sequences over 2 replicas
        await streams[0].aclose()  # the client left: the stream is cancelled, which frees the sequence
        assert handle.streams[0].cancelled and await worker.load() == 1.0
        assert [d.token_ids async for d in streams[1]] == [[1], [2], [3], [4]]
        await worker.abort("r2")
        assert "abort" not in handle.calls and await worker.load() == 0.5
        await streams[2].aclose()
        assert await worker.load() == 0.0
    asyncio.run(run())


def test_pool_worker_wakes_an_empty_pool_with_one_waiting_call():
    from moemesh.cluster.serve.ingress import PoolWorker

    async def run():
        handle = FakeHandle()
        replicas = [0]

        async def count():
            reads.append(replicas[0])
            return replicas[0]
        reads: list[int] = []
        worker = PoolWorker(handle, spill_at=4, count=count, refresh_s=3600)
        worker.replicas()
        await _until("the first read", lambda: reads == [0])
        worker.wake()
        await _until("the wake's call at the handle", lambda: handle.calls)
        for _ in range(2):  # while that call waits, more wakes send nothing
            worker.wake()
            await asyncio.sleep(0)
        assert handle.calls == ["load"]  # one call waits at the handle; Serve starts a replica for it
        replicas[0] = 1
        handle.started.set()
        await _until("the read after the answer", lambda: len(reads) == 2)
        assert worker.replicas() == 1 and handle.calls == ["load"]  # once answered, the count is read again at once
    asyncio.run(run())


# ---- a pool replica following the expert controller's map -----------------------------------------------------------
def test_a_pool_replica_pulls_the_map_and_releases_old_shards_after_the_drain(monkeypatch):
    import moemesh.cluster.serve.attention as app

    class Controller:
        """The controller's side of `pool_sync` (what ExpertControllerReplica is to add): the map in force."""

        def __init__(self):
            self.map = {"version": 1, "replicas": {"replica-1": {0: [3]}}, "addresses": {"replica-1": "h:1"}}
            self.reports: list[tuple] = []
            self.pool_sync = self

        def remote(self, name, state, loads, latency):
            self.reports.append((name, dict(state), dict(loads)))
            self.latency = latency

            async def answer():
                return self.map
            return answer()

    class Replica(app.AttentionPoolReplica):
        def __init__(self):  # no model: only the map bookkeeping of a worker
            self.state = {"version": 0, "in_use": [], "shards": []}
            self.installed, self.released = [], []

        async def expert_map_state(self):
            return dict(self.state)

        async def expert_loads(self):
            return {"0/3": 7}

        async def dispatch_latency(self):
            return {"0": [4, 0.2]}

        async def install_expert_map(self, version, replicas, addresses):
            self.installed.append((version, sorted(replicas), dict(addresses)))
            self.state.update(version=version, shards=sorted(replicas))
            return version

        async def release_shards(self, names):
            self.released.append(list(names))
            return list(names)

    class Context:
        class replica_id:
            unique_id = "abc"
    monkeypatch.setattr(app.serve, "get_replica_context", lambda: Context)
    monkeypatch.setattr(app, "EXPERT_MAP_SYNC_S", 0.01)

    async def run():
        replica, controller = Replica(), Controller()
        task = asyncio.ensure_future(replica._follow_expert_map(controller))
        await _until("map 1 installed", lambda: replica.installed)
        assert replica.installed == [(1, ["replica-1"], {"replica-1": "h:1"})]
        assert controller.reports[0] == ("attention-pool#abc", {"version": 0, "in_use": [], "shards": []},
                                         {"0/3": 7})
        assert controller.latency == {"0": [4, 0.2]}  # the dispatch latency travels with the loads
        replica.state["in_use"] = [1]  # a dispatch runs under map 1 ...
        controller.map = {"version": 2, "replicas": {}, "addresses": {}}  # ... when replica-1 leaves the map
        await _until("map 2 installed", lambda: replica.installed[-1][0] == 2)

        def syncs_on_2_in_use_1() -> int:
            return sum(1 for _, state, _ in controller.reports if state["version"] == 2 and state["in_use"] == [1])
        # the second report after the install comes after the replica decided on the first one's answer
        await _until("a sync on map 2 with map 1 in use", lambda: syncs_on_2_in_use_1() >= 2)
        assert not any(replica.released)  # the channel stays until that dispatch is done
        replica.state["in_use"] = []
        await _until("replica-1 released", lambda: ["replica-1"] in replica.released)
        task.cancel()
    asyncio.run(run())


# ---- live on the cluster ---------------------------------------------------------------------------------------------
CONCURRENCY = 8
MAX_TOKENS = 12
POOL_CONFIG = {
    "attention": {"replicas": 1, "max_num_seqs": 4, "kv_cache_blocks": 512, "block_size": 16,
                  "placement": {"num_cpus": 0.5, "resources": {"head_node": 1}},
                  "autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_queue_per_replica": 2,
                                  "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 4,
                                  "drain_timeout_s": 30}},
    "experts": {"shards": 1, "placement": {"num_cpus": 0.5, "resources": {"expert_node": 1}}},
    "engram": {"shards": 1, "placement": {"num_cpus": 0.5, "resources": {"engram_node": 1}}},
    "ingress": {"model_name": "tiny", "limits": {"max_worker_load": 1000}},
}


@pytest.fixture(scope="module")
def pool_app(side_app):
    with side_app("pool", POOL_CONFIG) as url:
        yield url


def _pool_replicas() -> int:
    from moemesh.cluster.names import ATTENTION_POOL as POOL
    from moemesh.cluster.serve.ingress import _running_replicas

    return asyncio.run(_running_replicas("pool", POOL))


def _handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="pool")


async def _cancel_on_the_pool() -> tuple[int, float, float]:
    """What the ingress does for a client that leaves: a `PoolWorker` stream, closed after two deltas (no abort).
    -> (tokens seen, PoolWorker load after, the pool replica's load a moment after)."""
    from moemesh.cluster.serve.ingress import PoolWorker

    async def one() -> int:
        return 1
    worker = PoolWorker(_handle("attention-pool"), spill_at=2, count=one)
    stream = worker.generate("cancel-me", [5, 6, 7], RequestParams(max_tokens=3000, temperature=0,
                                                                        ignore_eos=True))
    seen = len((await anext(stream)).token_ids) + len((await anext(stream)).token_ids)
    await stream.aclose()
    await worker.abort("cancel-me")
    deadline = asyncio.get_running_loop().time() + 60
    while True:  # a condition wait: the replica's engine drops it between steps
        left = await _handle("attention-pool").load.remote()
        if left == 0 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    return seen, await worker.load(), left


@pytest.mark.timeout(600)
def test_the_pool_grows_with_the_queue_and_goes_back_to_zero(pool_app, reference, wait_until, http_load):
    prompts = reference.prompts(7)
    expected = reference.texts(prompts, MAX_TOKENS)

    r = httpx.post(f"{pool_app}/completions", timeout=120, json={"model": "tiny", "prompt": prompts[0],
                                                                 "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert _pool_replicas() == 0  # one request fits the fixed rank: the pool stays empty

    # A sequence sent to the empty pool starts a replica (Serve's cold start); the client leaving frees it there.
    seen, local, remote = asyncio.run(_cancel_on_the_pool())
    assert seen >= 2 and local == 0 and remote == 0
    wait_until("the idle pool back at zero", lambda: _pool_replicas() == 0, timeout_s=90)

    load = http_load(pool_app, prompts, CONCURRENCY, MAX_TOKENS).start()
    try:
        wait_until("two pool replicas under load", lambda: _pool_replicas() == 2, timeout_s=180)
        wait_until("the pool serving sequences", lambda: _handle("attention-pool").load.remote()
                   .result(timeout_s=60) > 0, timeout_s=60)
        done = len(load.results)
        wait_until("more answers with the grown pool", lambda: len(load.results) >= done + 2 * CONCURRENCY,
                   timeout_s=120)
    finally:
        load.stop()
    wait_until("the pool back at zero after the load", lambda: _pool_replicas() == 0, timeout_s=120)

    load.check(expected)
    assert _handle("attention-worker-0").load.remote().result(timeout_s=60) == 0
    print(f"requests: {len(load.results)} answered, all equal to the reference")
