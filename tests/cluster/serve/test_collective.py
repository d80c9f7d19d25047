"""`experts.transport: collective` on the 3-node cluster: the fixed attention workers reach the base expert shards
over one gloo process group (the CPU stand-in for NCCL/HCCL), everything else over gRPC. Under concurrent load
every answer equals the single-process reference and the collective path carries the dispatches; after one shard is
killed (by PID) the workers move to gRPC for it, Serve's restart (which cannot rejoin the group) serves over gRPC,
and no request fails.

A separate application (`collective`) runs beside the session's `moemesh` app. Plus a process-free check of
HybridTransport's fallback."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest
import torch
from moemesh.proto import errors
from moemesh.proto.hybrid import HybridTransport
from moemesh.proto.transport import ExpertTransport

CONCURRENCY = 8
MAX_TOKENS = 8
APP = "collective"
COLLECTIVE_CONFIG = {
    "attention": {"replicas": 2, "max_num_seqs": 8, "kv_cache_blocks": 512, "block_size": 16,
                  "placement": {"num_cpus": 0.5, "resources": {"head_node": 1}}},
    "experts": {"shards": 2, "transport": "collective", "collective_timeout_s": 240,
                "placement": {"num_cpus": 0.5, "resources": {"expert_node": 1}}},
    "engram": {"shards": 1, "placement": {"num_cpus": 0.5, "resources": {"engram_node": 1}}},
    "ingress": {"model_name": "tiny", "limits": {"max_worker_load": 1000}},
}


@pytest.fixture(scope="module")
def collective_app(side_app):
    with side_app(APP, COLLECTIVE_CONFIG) as url:
        yield url


def _call(deployment: str, method: str, timeout_s: float = 60):
    from ray import serve

    return getattr(serve.get_deployment_handle(deployment, app_name=APP), method).remote().result(timeout_s=timeout_s)


def _links() -> dict[str, int]:
    """Replies per link kind, summed over both workers."""
    out = {"collective": 0, "grpc": 0}
    for k in range(2):
        for kind, n in _call(f"attention-worker-{k}", "stats")["messages_by_link"].items():
            out[kind] += n
    return out


@pytest.mark.timeout(900)
def test_collective_transport_serves_and_falls_back_to_grpc(collective_app, reference, wait_until, http_load):
    prompts = reference.prompts(7)
    want = reference.texts(prompts, MAX_TOKENS)
    wait_until("the collective app to answer", lambda: httpx.post(f"{collective_app}/completions", timeout=120, json={
        "model": "tiny", "prompt": prompts[0], "max_tokens": 2}).status_code == 200, timeout_s=300)

    load = http_load(collective_app, prompts, CONCURRENCY, MAX_TOKENS).start()
    try:
        wait_until("warm-up answers", lambda: len(load.results) >= 2 * CONCURRENCY, timeout_s=300)
        # every base shard joined the group and served over it; the workers' dispatches went that way
        served_collectively = [_call(f"expert-shard-{i}", "stats")["collective_requests"] for i in range(2)]
        assert all(n and n > 0 for n in served_collectively), served_collectively
        before = _links()
        assert before["collective"] > 0 and before["grpc"] == 0, before

        pid = _call("expert-shard-1", "pid")
        os.kill(pid, signal.SIGKILL)  # exactly the replica process this test's app started
        wait_until("expert-shard-1 restarted", lambda: _call("expert-shard-1", "pid", 120) != pid, timeout_s=300)
        done = len(load.results)
        wait_until("answers after the restart", lambda: len(load.results) >= done + 2 * CONCURRENCY, timeout_s=300)
        after = _links()
        assert after["grpc"] > 0 and after["collective"] > before["collective"], (before, after)  # shard 0 still
        assert _call("expert-shard-1", "stats")["collective_requests"] is None  # the restart did not join
    finally:
        load.stop()

    load.check(want)
    print(f"requests: {len(load.results)}; replies by link before the kill {before}, at the end {after}")


# ---- HybridTransport's fallback, without processes -------------------------------------------------------------------
class _Fake(ExpertTransport):
    def __init__(self, shards, down=()):
        self.shard_ranks = self.addresses = dict.fromkeys(shards, 0)
        self.down, self.breaks, self.calls = set(down), set(), []

    def is_down(self, shard) -> bool:
        return shard in self.down

    async def dispatch(self, shard, batch):
        self.calls.append(shard)
        if shard in self.breaks:
            self.down.add(shard)
        if shard in self.down:
            raise errors.Unavailable(f"{shard} down")
        return torch.zeros(1)


def test_hybrid_falls_back_to_grpc_for_a_broken_link_and_stays_there():
    collective, grpc_part = _Fake([0, 1]), _Fake([0, 1, "r"])
    hybrid = HybridTransport({0: "collective", 1: "collective", "r": "grpc"}, collective=collective,
                             grpc_transport=grpc_part)

    async def run():
        await hybrid.dispatch(1, None)
        collective.breaks.add(1)  # its link breaks during the next call: that call is sent again over gRPC
        await hybrid.dispatch(1, None)
        await hybrid.dispatch(1, None)  # and the shard stays on gRPC
        await hybrid.dispatch(0, None)
    asyncio.run(run())
    assert collective.calls == [1, 1, 0] and grpc_part.calls == [1, 1]
    assert hybrid.messages == {"collective": 2, "grpc": 2} and hybrid.fallbacks == [1]

    # a shard-side Unavailable with the link intact (e.g. the shard is closing) is the Dispatcher's to handle
    class Refusing(_Fake):
        async def dispatch(self, shard, batch):
            raise errors.Unavailable("closing")
    only = HybridTransport({0: "collective"}, collective=Refusing([0]), grpc_transport=_Fake([0]))
    with pytest.raises(errors.Unavailable):
        asyncio.run(only.dispatch(0, None))
