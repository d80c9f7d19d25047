"""The attention pool's autoscaling policy (cluster/serve/pool_policy.py) on constructed Serve contexts, Serve's own
wrapper around it (delays and bounds), the TTFT window, and the ingress side of the pool: spill routing
(actors/ingress/generation.py `ElasticWorker`). No Ray cluster."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from moemesh.actors.ingress.generation import ElasticWorker, LeastLoadedRouter
from moemesh.actors.ingress.protocol import OpenAIError
from moemesh.cluster.serve.pool_policy import POLICY_PATH, QUEUE, TTFT, AttentionPoolPolicy, RecentTtft, pool_stats

DEP = DeploymentID(name="attention-pool", app_name="moemesh")


def _replicas(n: int) -> list[ReplicaID]:
    return [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(n)]


def _ctx(replicas: list[ReplicaID], queues: list | dict = (), ttfts: list = (), *, queued: float = 0.0,
         target: int | None = None, lo: int = 0, hi: int = 4, state: dict | None = None,
         config: AutoscalingConfig | None = None) -> AutoscalingContext:
    """A context as Serve's controller builds it; `queues` / `ttfts`: per replica, in order (or by replica id)."""
    queues = queues if isinstance(queues, dict) else dict(zip(replicas, queues))
    metrics = {QUEUE: queues, TTFT: dict(zip(replicas, ttfts))}
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=len(replicas),
        target_num_replicas=len(replicas) if target is None else target, running_replicas=replicas,
        total_num_requests=lambda: sum(queues.values()) + queued, total_queued_requests=lambda: queued,
        aggregated_metrics=lambda: metrics, raw_metrics=lambda: {}, capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi, policy_state=dict(state or {}), last_scale_up_time=None,
        last_scale_down_time=None, current_time=1000.0,
        config=config or AutoscalingConfig(min_replicas=lo, max_replicas=max(hi, 1)))


# ---- the policy ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("queues, want", [
    ((), 0),                 # nothing running: no replica
    ((3.0,), 1),             # below one replica's target
    ((4.0,), 1),             # exactly one replica's worth
    ((4.0000001,), 1),       # float noise of a time-weighted mean does not add a replica
    ((5.0,), 2),
    ((6.0, 7.0), 4),         # 13 sequences (running + waiting in the engines)
    ((8.0, 8.0, 8.0), 4),    # 24 wanted 6: clamped to max 4
    ((0.5, 0.0), 1),         # shrink to what the queue needs
])
def test_replicas_follow_the_queue(queues, want):
    policy = AttentionPoolPolicy(target_queue_per_replica=4)
    got, state = policy(_ctx(_replicas(len(queues)), list(queues)))
    assert got == want
    assert state["queue"] == pytest.approx(sum(queues))


def test_requests_waiting_at_a_handle_are_left_to_serve():
    """After a cold start the handle still reports its one waiting request for up to 10 s: not a reason to grow."""
    policy = AttentionPoolPolicy(target_queue_per_replica=2)
    replicas = _replicas(1)
    assert policy(_ctx(replicas, queued=1.0))[0] == 1  # the new replica has not reported: it counts as needed
    assert policy(_ctx(replicas, [0.0], queued=1.0))[0] == 0


def test_a_replica_that_has_not_reported_counts_as_busy():
    policy = AttentionPoolPolicy(target_queue_per_replica=4)
    replicas = _replicas(2)
    got, state = policy(_ctx(replicas, {replicas[0]: 1.0}))  # the second one just started
    assert state["queue"] == 5.0 and got == 2


def test_slow_first_tokens_add_a_replica_and_hold_it():
    policy = AttentionPoolPolicy(target_queue_per_replica=8, target_ttft_s=0.5)
    replicas = _replicas(2)
    got, state = policy(_ctx(replicas, [2.0, 2.0], ttfts=[0.2, 0.9]))
    assert (got, state["slow"], state["ttft_p90_s"]) == (3, True, 0.9)  # the queue alone wants 1
    assert policy(_ctx(replicas, [2.0, 2.0], ttfts=[0.2, 0.4]))[0] == 1  # fast again: the queue decides
    assert policy(_ctx(replicas, [2.0, 2.0], ttfts=[0.9, 0.9], hi=2))[0] == 2  # never above max


def test_min_replicas_and_capacity_bounds_apply():
    policy = AttentionPoolPolicy(target_queue_per_replica=4)
    assert policy(_ctx([], lo=1))[0] == 1
    assert policy(_ctx(_replicas(1), [40.0], hi=3))[0] == 3


@pytest.mark.parametrize("kwargs, needle", [
    ({"target_queue_per_replica": 0}, "target_queue_per_replica"),
    ({"target_queue_per_replica": 4, "target_ttft_s": -1.0}, "target_ttft_s"),
])
def test_bad_policy_arguments_name_the_field_and_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AttentionPoolPolicy(**kwargs)


# ---- as Serve runs it ------------------------------------------------------------------------------------------------
def _serve_policy(target_queue: float):
    """The policy as Serve's controller calls it: built from the same `policy` dict cluster/serve/app.py passes, wrapped
    with Serve's delays, scaling factors and cold start."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    config = AutoscalingConfig(min_replicas=0, max_replicas=4, upscale_delay_s=5, downscale_delay_s=20,
                               policy={"policy_function": POLICY_PATH,
                                       "policy_kwargs": {"target_queue_per_replica": target_queue}})
    return _apply_autoscaling_config(_resolve_policy_callable(config.policy)), config


def test_serve_applies_its_delays_to_the_policy(monkeypatch):
    import ray.serve.autoscaling_policy as serve_autoscaling

    clock = [1000.0]
    monkeypatch.setattr(serve_autoscaling.time, "time", lambda: clock[0])
    policy, config = _serve_policy(4)
    state: dict = {}

    def step(replicas, queues, target, queued=0.0):
        nonlocal state
        got, state = policy(_ctx(replicas, queues, queued=queued, target=target, hi=4, state=state, config=config))
        return got

    assert step([], [], 0, queued=1.0) == 1          # cold start: a request waits at the handle -> one at once
    one = _replicas(1)
    assert step(one, [12.0], 1) == 1               # wants 3, must hold for upscale_delay_s (5 s)
    clock[0] += 5
    assert step(one, [12.0], 1) == 3
    three = _replicas(3)
    assert step(three, [0.0, 0.0, 0.0], 3) == 3    # idle: wait downscale_delay_s (20 s)
    clock[0] += 19
    assert step(three, [0.0, 0.0, 0.0], 3) == 3
    clock[0] += 1
    assert step(three, [0.0, 0.0, 0.0], 3) == 1    # Serve reaches zero only from one replica,
    assert step(one, [0.0], 1) == 1
    clock[0] += 20
    assert step(one, [0.0], 1) == 0                # after another downscale_delay_s


# ---- what replicas report --------------------------------------------------------------------------------------------
def test_recent_ttft_is_the_p90_of_the_window():
    now = [0.0]
    window = RecentTtft(10.0, clock=lambda: now[0])
    assert window.p90() == 0.0
    for i in range(1, 11):
        window.add(i / 10)
    assert window.p90() == pytest.approx(0.9)
    now[0] = 10.5
    window.add(2.0)
    assert window.p90() == pytest.approx(2.0)  # the old ones left the window
    now[0] = 30.0
    assert window.p90() == 0.0
    assert pool_stats(3, 0.25) == {QUEUE: 3.0, TTFT: 0.25}


# ---- the ingress side: spill routing over fixed workers and a pool ---------------------------------------------------
class Fixed:
    def __init__(self, load: float):
        self.value = load

    def generate(self, request_id, prompt_token_ids, params):
        raise NotImplementedError

    async def load(self) -> float:
        return self.value

    async def abort(self, request_id: str) -> None:
        return None


class Pool(Fixed):
    def __init__(self, load: float, replicas: int, spill_at: float = 4.0):
        super().__init__(load)
        self.n, self.spill_at, self.woken, self.asked = replicas, spill_at, 0, 0

    async def load(self) -> float:
        self.asked += 1
        return self.value

    def replicas(self) -> int:
        return self.n

    def wake(self) -> None:
        self.woken += 1


def _pick(router, **kw):
    return asyncio.run(router.pick(**kw))


def test_fixed_ranks_take_work_until_they_hold_the_target():
    a, pool = Fixed(3.0), Pool(0.0, replicas=1)
    assert isinstance(pool, ElasticWorker) and not isinstance(a, ElasticWorker)
    router = LeastLoadedRouter([a, pool])
    assert _pick(router) is a  # the pool is idle, but the fixed rank is below 4
    a.value = 4.0
    assert _pick(router) is pool  # the fixed rank is full: spill to the pool's least loaded replica
    pool.value = 5.0
    assert _pick(router) is a  # both above: least loaded wins
    assert pool.woken == 0


def test_an_empty_pool_is_woken_not_waited_for():
    a, pool = Fixed(6.0), Pool(0.0, replicas=0)
    router = LeastLoadedRouter([a, pool])
    assert _pick(router) is a and pool.woken == 1 and pool.asked == 0  # no load() call on an empty pool
    a.value = 1.0
    assert _pick(router) is a and pool.woken == 1  # below the target: no reason to start one
    assert asyncio.run(router.loads()) == [1.0, None]


def test_an_empty_pool_is_woken_when_no_fixed_rank_answers_and_when_all_are_full():
    dead, pool = Fixed(float("nan")), Pool(0.0, replicas=0)
    router = LeastLoadedRouter([dead, pool])
    with pytest.raises(OpenAIError) as err:
        _pick(router)
    assert err.value.status == 503 and pool.woken == 1
    full = Fixed(16.0)
    router = LeastLoadedRouter([full, pool], max_load=16)
    with pytest.raises(OpenAIError) as err:
        _pick(router)
    assert err.value.status == 429 and pool.woken == 2


def test_a_lost_pool_is_skipped_like_a_lost_rank():
    a, pool = Fixed(9.0), Pool(0.0, replicas=2)
    router = LeastLoadedRouter([a, pool])
    router.mark_down(pool, 60)
    assert _pick(router, limit=False) is a and pool.woken == 0
