"""The scheduler as plain bookkeeping (no tensors, no model): FIFO admission under slot, block, watermark and token
budgets; one decode token per running sequence per step; chunked prefill; preemption of the most recently admitted
sequence, requeued at the front and replayed in its recorded chunks; abort and finish free everything; requests that
could never fit are refused with the numbers; a long random run keeps the block accounting exact."""

from __future__ import annotations

import random

import pytest

from moemesh.actors.attention.blocks import BlockManager, CacheLayout, RowStore
from moemesh.actors.attention.scheduler import Scheduler, SchedulerConfig
from moemesh.actors.attention.sequence import Sequence, SequenceStatus

# one store, one row per token, one row per block: a sequence of n tokens holds n blocks
ONE_PER_TOKEN = CacheLayout(block_size=1, block_elems=1, stores=(RowStore(0, "kv", 1, 1, 1),), fields=(),
                            slot_elems=0)


def _sched(num_blocks: int, slots: int = 4, **cfg) -> Scheduler:
    cfg.setdefault("watermark", 0.0)
    return Scheduler(BlockManager(ONE_PER_TOKEN, num_blocks, slots), SchedulerConfig(max_num_seqs=slots, **cfg))


def _seq(rid: str, n: int, max_tokens: int = 4, stop=()) -> Sequence:
    return Sequence(rid, list(range(10, 10 + n)), max_tokens, frozenset(stop))


def _step(s: Scheduler, token: int = 7):
    """schedule + update, sampling `token` for everyone -> (plan, finished)."""
    out = s.schedule()
    return out, s.update(out, {c.seq.request_id: token for c in out.chunks if c.sample})


def _fed(out) -> dict[str, int]:
    return {c.seq.request_id: len(c.token_ids) for c in out.chunks}


def test_fifo_admission_within_max_num_seqs_then_one_token_per_step():
    s = _sched(100, slots=2)
    for rid, n in (("a", 5), ("b", 3), ("c", 2)):
        s.add(_seq(rid, n))
    out, _ = _step(s)
    assert _fed(out) == {"a": 5, "b": 3} and [q.request_id for q in s.waiting] == ["c"]
    assert all(c.sample for c in out.chunks) and [c.start for c in out.chunks] == [0, 0]
    out, _ = _step(s)
    assert _fed(out) == {"a": 1, "b": 1}
    assert out.chunks[0].token_ids == [7] and out.chunks[0].start == 5
    s.abort("a")
    out, _ = _step(s)
    assert _fed(out) == {"b": 1, "c": 2} and out.admitted == [s.get("c")]


def test_the_head_of_the_queue_is_not_overtaken_when_blocks_are_short():
    s = _sched(10)
    s.add(_seq("a", 6))
    _step(s)
    s.add(_seq("big", 5))  # 5 blocks: only 3 are free after a's decode
    s.add(_seq("small", 1))
    out, _ = _step(s)
    assert _fed(out) == {"a": 1} and [q.request_id for q in s.waiting] == ["big", "small"]


def test_watermark_keeps_room_for_running_sequences_but_not_for_a_lone_one():
    s = _sched(20, watermark=0.25)  # 5 blocks kept free while others run
    s.add(_seq("a", 20, max_tokens=1))  # alone: may take every block
    out, finished = _step(s)
    assert _fed(out) == {"a": 20} and finished[0].finish_reason == "length"
    s.add(_seq("b", 10))
    s.add(_seq("c", 6))
    out, _ = _step(s)
    assert _fed(out) == {"b": 10}  # c would leave 4 < 5 free


def test_token_budget_limits_prefill_and_the_first_chunk_always_goes():
    s = _sched(100, max_num_batched_tokens=8, chunked_prefill=False)
    s.add(_seq("a", 6))
    s.add(_seq("b", 6))
    out, _ = _step(s)
    assert _fed(out) == {"a": 6}
    out, _ = _step(s)
    assert _fed(out) == {"a": 1, "b": 6}
    s.add(_seq("long", 30))
    _step(s)  # a, b decode: 2 tokens; long (30) does not fit the 6 left
    s.abort("a")
    s.abort("b")
    out, _ = _step(s)
    assert _fed(out) == {"long": 30}  # alone, over the budget: taken anyway


def test_chunked_prefill_feeds_budget_sized_chunks_and_samples_only_at_the_end():
    s = _sched(100, max_num_batched_tokens=4, chunked_prefill=True)
    s.add(_seq("a", 10))
    sizes, samples = [], []
    for _ in range(4):
        out, _ = _step(s)
        sizes.append(_fed(out)["a"])
        samples.append(out.chunks[0].sample)
    assert sizes == [4, 4, 2, 1] and samples == [False, False, True, True]
    assert s.get("a").output_token_ids == [7, 7] and s.get("a").chunks == [4, 4, 2, 1]


def test_preemption_takes_the_most_recent_requeues_it_first_and_replays_its_chunks():
    s = _sched(12)
    for rid, n in (("a", 3), ("b", 3), ("c", 3)):
        s.add(_seq(rid, n))
    _step(s)  # 9 blocks
    s.add(_seq("d", 1))
    _step(s)  # a, b, c decode: 12 blocks, d does not fit
    out, _ = _step(s)  # a needs a block: c, admitted last, is preempted
    assert [q.request_id for q in out.preempted] == ["c"] and _fed(out) == {"a": 1, "b": 1}
    assert not out.admitted  # no admission in a step that preempts
    assert [q.request_id for q in s.waiting] == ["c", "d"]  # at the front
    c = s.get("c")
    assert c.status is SequenceStatus.WAITING and c.num_computed == 0 and c.output_token_ids == [7, 7]
    assert not s.blocks.holds("c") and s.blocks.num_free_blocks == 2
    s.abort("a")
    s.abort("b")
    replay = []
    for _ in range(3):
        out, _ = _step(s)
        replay.append([(q.seq.request_id, len(q.token_ids), q.sample) for q in out.chunks])
    # c feeds its recorded chunks again (prompt, then one token), sampling only once caught up; d joins behind it
    assert replay == [[("c", 3, False), ("d", 1, True)], [("c", 1, False), ("d", 1, True)],
                      [("c", 1, True), ("d", 1, True)]]
    assert c.output_token_ids == [7, 7, 7] and c.chunks == [3, 1, 1] and s.num_preemptions == 1


def test_a_sequence_that_is_itself_the_most_recent_preempts_itself_after_the_others():
    layout = CacheLayout(block_size=1, block_elems=1, stores=(RowStore(0, "kv", 1, 2, 1),), fields=(),
                         slot_elems=0)  # one block per 2 tokens: a 1-token sequence holds none
    s = Scheduler(BlockManager(layout, 4, 4), SchedulerConfig(max_num_seqs=4, watermark=0))
    s.add(_seq("a", 7, max_tokens=3))
    _step(s)  # 3 blocks
    s.add(_seq("b", 1))
    s.add(_seq("c", 1))
    _step(s)  # a: 4 blocks; b and c: none
    out, _ = _step(s)  # b needs its first block: c (newest) frees nothing, so b preempts itself
    assert [q.request_id for q in out.preempted] == ["c", "b"] and _fed(out) == {"a": 1}
    assert [q.request_id for q in s.waiting] == ["b", "c"]


def test_a_request_that_could_never_fit_is_refused_and_inexact_recompute_refeeds_at_once():
    s = _sched(10, exact_recompute=False)
    with pytest.raises(ValueError, match=r"'x': 8 prompt tokens \+ max_tokens 4 need 11 KV blocks, the cache has 10"):
        s.add(_seq("x", 8, max_tokens=4))
    s.add(_seq("a", 4))
    s.add(_seq("b", 4))
    _step(s)
    _step(s)  # 10 blocks
    out, _ = _step(s)
    assert [q.request_id for q in out.preempted] == ["b"]
    s.abort("a")
    out, _ = _step(s)
    assert _fed(out) == {"b": 6} and out.chunks[0].sample  # prompt + 2 generated tokens, one chunk


def test_finish_on_stop_token_and_length_frees_blocks_and_abort_of_waiting_works():
    s = _sched(50)
    s.add(_seq("stops", 2, stop={7}))
    s.add(_seq("short", 2, max_tokens=2))
    _, finished = _step(s)
    assert [(q.request_id, q.finish_reason) for q in finished] == [("stops", "stop")]
    _, finished = _step(s)
    assert [(q.request_id, q.finish_reason) for q in finished] == [("short", "length")]
    assert s.blocks.num_free_blocks == 50 and not s.has_unfinished()
    s.add(_seq("w", 2))
    assert s.abort("w").finish_reason == "abort" and not s.waiting and s.abort("w") is None
    s.add(_seq("x", 1))
    with pytest.raises(ValueError, match="'x' is already in use"):
        s.add(_seq("x", 1))


def test_random_traffic_keeps_accounting_exact_and_frees_everything():
    rng = random.Random(1)
    s = Scheduler(BlockManager(CacheLayout.from_config(_tiny_cfg(), 4), 60, 4),
                  SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64))
    added = 0
    for step in range(400):
        if rng.random() < 0.3:
            s.add(Sequence(f"r{added}", [5] * rng.randrange(1, 60), rng.randrange(1, 30), frozenset({3})))
            added += 1
        if rng.random() < 0.03 and s.running:
            s.abort(rng.choice(s.running).request_id)
        _step(s, token=rng.choice([3] + [9] * 30))
        s.blocks.check()
        held = sum(s.blocks.blocks_needed(q.num_computed) for q in s.running)
        assert s.blocks.usage().used_blocks == held
        assert all(not s.blocks.holds(q.request_id) for q in s.waiting)
    while s.has_unfinished():
        _step(s)
    assert s.blocks.usage().used_blocks == 0 and s.blocks.num_free_slots == 4 and s.num_preemptions > 0


def _tiny_cfg():
    from moemesh.kernels.tiny import tiny_config

    return tiny_config(512)
