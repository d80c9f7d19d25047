"""Prefix-aware routing without Ray: the policy (`PrefixAffinity`) and `LeastLoadedRouter.pick` over fake workers
whose loads the test sets."""

from __future__ import annotations

import asyncio

import pytest

from moemesh.actors.ingress.generation import LeastLoadedRouter
from moemesh.actors.ingress.prefix_routing import PrefixAffinity, PrefixRoutingConfig

G = 4  # tokens per prefix block in these tests


class FakeWorker:
    def __init__(self, load: float = 0.0):
        self.load_now = load

    async def load(self) -> float:
        return self.load_now

    async def generate(self, request_id, prompt_token_ids, params):
        yield None

    async def abort(self, request_id: str) -> None:
        pass


def _router(n: int, spill: float = 2.0, **kw) -> tuple[LeastLoadedRouter, list[FakeWorker]]:
    workers = [FakeWorker() for _ in range(n)]
    return LeastLoadedRouter(workers, prefix_routing=PrefixRoutingConfig(block_tokens=G, spill=spill, **kw)), workers


def _pick(router, prompt) -> int:
    return router.workers.index(asyncio.run(router.pick(prompt=prompt)))


SYSTEM = list(range(100, 112))  # three blocks


def test_a_shared_prefix_follows_the_worker_that_served_it():
    router, workers = _router(3)
    first = _pick(router, SYSTEM + [1, 2])
    workers[first].load_now = 1  # it is now busier than the others, but within the spill
    assert _pick(router, SYSTEM + [7, 8, 9, 10, 11]) == first
    other = _pick(router, [5, 6, 7, 8, 9])  # an unrelated prompt goes by load
    assert other != first


def test_the_longest_remembered_prefix_wins():
    router, workers = _router(3)
    a = _pick(router, SYSTEM[:4] + [1, 1, 1, 1])
    workers[a].load_now = 1
    b = _pick(router, SYSTEM[:8] + [2, 2, 2, 2])  # shares one block with a's prompt: goes to a
    assert b == a
    router.affinity.record(router.affinity.chain(SYSTEM[:8]), 2)  # a later request moved the 2-block prefix to 2
    assert _pick(router, SYSTEM[:8] + [3, 3, 3, 3]) == 2
    assert _pick(router, SYSTEM[:4] + [4, 4, 4, 4]) == 2  # recorded for its one block too


def test_a_busy_owner_spills_to_the_least_loaded_worker_which_becomes_the_owner():
    router, workers = _router(2, spill=2.0)
    owner = _pick(router, SYSTEM)
    workers[owner].load_now = 3  # 3 > 0 + spill
    moved = _pick(router, SYSTEM + [9])
    assert moved != owner
    workers[owner].load_now = 0
    assert _pick(router, SYSTEM + [9, 9]) == moved  # the prefix lives there now


def test_short_prompts_unknown_prefixes_and_lost_workers_go_by_load():
    router, workers = _router(3)
    workers[0].load_now, workers[1].load_now, workers[2].load_now = 2, 0, 1
    assert _pick(router, [1, 2, 3]) == 1  # shorter than a block: nothing to match
    assert _pick(router, SYSTEM) == 1
    router.mark_down(workers[1], 60)  # lost: skipped, and its prefixes forgotten
    assert _pick(router, SYSTEM) == 2
    assert all(w != 1 for w in router.affinity._owner.values())


def test_without_prefix_routing_the_router_is_least_loaded_round_robin():
    workers = [FakeWorker() for _ in range(3)]
    router = LeastLoadedRouter(workers)
    assert router.affinity is None
    picks = [workers.index(asyncio.run(router.pick(prompt=SYSTEM))) for _ in range(3)]
    assert sorted(picks) == [0, 1, 2]  # the same prompt is spread by round-robin


def test_the_map_is_bounded_and_forgets_the_least_recently_used():
    affinity = PrefixAffinity(PrefixRoutingConfig(block_tokens=G, capacity=5, max_blocks=3))
    first = affinity.chain(list(range(40)))
    assert len(first) == 3  # max_blocks
    affinity.record(first, 0)
    affinity.record(affinity.chain(list(range(50, 90))), 1)
    assert len(affinity) == 5
    assert affinity.prefer(first, [0, 1], [0.0, 0.0]) == 0  # its longest block survived, the oldest went
    assert affinity.prefer(first[:1], [0, 1], [0.0, 0.0]) is None


@pytest.mark.parametrize("field, value", [("block_tokens", 0), ("spill", -1), ("capacity", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PrefixRoutingConfig(**{field: value})
