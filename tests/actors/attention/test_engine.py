"""The in-process engine on the built-in tiny model: continuous batching gives exactly the tokens `generate` gives
each prompt alone (submitted together, staggered, and under a block budget that forces preemption); a short request
added after a long one finishes first; seeded sampling does not depend on the batch;
abort and client disconnect free the KV memory; bad requests are refused naming the field; the forward pass is
pluggable; the asyncio front streams while the event loop stays free."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

import moemesh
from moemesh.actors.attention.engine import AsyncEngine, CacheConfig, Engine
from moemesh.actors.attention.scheduler import SchedulerConfig
from moemesh.actors.request import RequestParams
from moemesh.kernels.sampling import SamplingParams

LENGTHS = (1, 9, 40, 77, 130, 200)
NEW = 24


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(model):
    V = model.config.vocab_size
    return [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    """Each prompt alone through `generate`, cut after eos."""
    out = []
    for p in prompts:
        new = model.generate(torch.tensor([p]), max_new_tokens=NEW)[0, len(p):].tolist()
        eos = model.config.eos_token_id
        out.append(new[: new.index(eos) + 1] if eos in new else new)
    return out


def _run(engine: Engine, requests: dict[str, tuple[list[int], RequestParams]], every: int = 0) -> dict:
    """Add the requests (all at once, or one per `every` steps) and step to the end -> {id: (tokens, reason, finish
    step)}."""
    todo, got, step = list(requests.items()), {}, 0
    while todo or engine.has_unfinished():
        if todo and (every == 0 or step % every == 0):
            for rid, (prompt, params) in todo[: None if every == 0 else 1]:
                engine.add_request(rid, prompt, params)
            todo = [] if every == 0 else todo[1:]
        for out in engine.step():
            tokens, _, _ = got.get(out.request_id, ([], None, None))
            got[out.request_id] = (tokens + out.new_token_ids, out.finish_reason, step)
        step += 1
        engine.kv.manager.check()
    if engine.prefix is not None:
        engine.prefix.clear()  # cached prefixes hold blocks until evicted
    assert engine.kv.usage().used_blocks == 0 and engine.kv.usage().used_slots == 0
    return got


def _greedy(prompts) -> dict:
    return {f"r{i}": (p, RequestParams(max_tokens=NEW)) for i, p in enumerate(prompts)}


@pytest.mark.parametrize("every", [0, 2], ids=["together", "staggered"])
def test_greedy_batches_give_exactly_generate_alone(model, prompts, reference, every):
    engine = Engine(model, cache=CacheConfig(block_size=4), scheduler=SchedulerConfig(max_num_seqs=6))
    got = _run(engine, _greedy(prompts), every)
    for i, want in enumerate(reference):
        assert got[f"r{i}"][0] == want, f"prompt of {LENGTHS[i]} tokens"


def test_preemption_by_recompute_keeps_the_outputs_exact(model, prompts, reference):
    engine = Engine(model, cache=CacheConfig(block_size=4, num_blocks=50, enable_prefix_caching=False), scheduler=SchedulerConfig(max_num_seqs=6))
    got = _run(engine, _greedy(prompts))
    assert engine.scheduler.num_preemptions > 0
    for i, want in enumerate(reference):
        assert got[f"r{i}"][0] == want, f"prompt of {LENGTHS[i]} tokens"


def test_chunked_prefill_keeps_every_step_within_the_token_budget(model, prompts, reference):
    sizes = []

    def step(token_ids, caches):
        sizes.append(sum(len(t) for t in token_ids))
        return model.step(token_ids, caches)

    engine = Engine(model, model_step=step,
                    scheduler=SchedulerConfig(max_num_batched_tokens=32, chunked_prefill=True))
    got = _run(engine, _greedy(prompts))
    assert max(sizes) == 32
    for i, want in enumerate(reference):  # chunked prompts give the tokens of generate's one whole prefill
        assert got[f"r{i}"][0] == want, f"prompt of {LENGTHS[i]} tokens"


def test_recompute_in_one_prefill_keeps_the_outputs_exact(model, prompts, reference):
    engine = Engine(model, cache=CacheConfig(block_size=4, num_blocks=50, enable_prefix_caching=False),
                    scheduler=SchedulerConfig(max_num_seqs=6, exact_recompute=False))
    got = _run(engine, _greedy(prompts))
    assert engine.scheduler.num_preemptions > 0
    for i, want in enumerate(reference):
        assert got[f"r{i}"][0] == want, f"prompt of {LENGTHS[i]} tokens"


def test_a_short_request_added_after_a_long_one_finishes_first(model, prompts):
    engine = Engine(model, cache=CacheConfig(block_size=4))
    engine.add_request("long", prompts[3], RequestParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.add_request("short", prompts[1], RequestParams(max_tokens=5, ignore_eos=True))
    done = []
    while engine.has_unfinished():
        done += [(out.request_id, engine.stats().num_running) for out in engine.step() if out.finish_reason]
    assert done == [("short", 1), ("long", 0)]  # short finished while long was still running


def test_seeded_sampling_is_the_same_alone_in_a_batch_and_in_generate(model, prompts):
    params = RequestParams(max_tokens=15, temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    alone = _run(Engine(model), {"s": (prompts[2], params)})["s"][0]
    others = {f"o{i}": (p, RequestParams(max_tokens=10, temperature=1.0, seed=i)) for i, p in enumerate(prompts[:4])}
    batch = _run(Engine(model), {"o0": others.pop("o0"), "s": (prompts[2], params), **others}, every=1)["s"][0]
    sampling = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    ref = model.generate(torch.tensor([prompts[2]]), max_new_tokens=15, sampling=sampling)[0, len(prompts[2]):]
    assert alone == batch == ref[: len(alone)].tolist() and len(set(alone)) > 3


def test_abort_frees_the_blocks(model, prompts):
    engine = Engine(model, cache=CacheConfig(block_size=4, enable_prefix_caching=False))  # cached prefixes hold some
    engine.add_request("a", prompts[4], RequestParams(max_tokens=20))
    engine.add_request("b", prompts[5], RequestParams(max_tokens=20))
    engine.step()
    both = engine.kv.usage().used_blocks
    last = engine.abort("b")
    assert last.finish_reason == "abort" and last.completion_tokens == 1 and last.new_token_ids == []
    assert 0 < engine.kv.usage().used_blocks < both
    assert engine.abort("b") is None and engine.abort("nobody") is None
    engine.abort("a")
    assert engine.kv.usage().used_blocks == 0 and not engine.has_unfinished()


def test_bad_requests_are_refused_naming_the_field(model):
    for bad, words in (({"temperature": -1}, ["temperature", "-1"]), ({"top_p": 0}, ["top_p", "0"]),
                       ({"max_tokens": 0}, ["max_tokens"]), ({"best_of": 2}, ["best_of", "Extra"]),
                       ({"stop": [""]}, ["stop", "1..256 chars, got 0"]), ({"stop": ["x"] * 17}, ["16 stop strings"]),
                       ({"stop_token_ids": [-3]}, ["stop_token_ids", "[-3]"])):
        with pytest.raises(ValidationError) as e:
            RequestParams(**bad)
        assert all(w in str(e.value) for w in words), str(e.value)
    assert RequestParams(stop="x").stop == ["x"]
    engine = Engine(model, cache=CacheConfig(num_blocks=5, block_size=4), max_model_len=64)
    cases = (([], RequestParams(), "prompt_token_ids: need 1 or more token ids"),
             ([5, 512], RequestParams(), r"prompt_token_ids: token ids must be integers in \[0, 512\), got \[512\]"),
             ([5, "7"], RequestParams(), r"prompt_token_ids: token ids must be integers in \[0, 512\), got \['7'\]"),
             ([5] * 60, RequestParams(max_tokens=5), "prompt of 60 tokens \\+ max_tokens 5 exceed the context of 64"),
             ([5] * 40, RequestParams(), r"40 prompt tokens \+ max_tokens 16 need 14 KV blocks, the cache has 5"),
             ([5], RequestParams(stop_token_ids=[600]),
              r"stop_token_ids: token ids must be integers in \[0, 512\), got \[600\]"))
    for prompt, params, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.add_request("x", prompt, params)
    engine.add_request("x", [5], RequestParams())
    with pytest.raises(ValueError, match="'x' is already in use"):
        engine.add_request("x", [5], RequestParams())


def test_the_forward_pass_is_pluggable(model, prompts, reference):
    calls = []

    def step(token_ids, caches):
        calls.append(sum(len(t) for t in token_ids))
        return model.step(token_ids, caches)

    engine = Engine(model, model_step=step)
    got = _run(engine, {"a": (prompts[2], RequestParams(max_tokens=NEW))})
    assert got["a"][0] == reference[2] and calls == [LENGTHS[2]] + [1] * (len(reference[2]) - 1)


def test_async_generate_streams_and_frees_on_disconnect(model, prompts, reference):
    engine = Engine(model, cache=CacheConfig(block_size=4))
    front = AsyncEngine(engine)

    async def collect(rid, prompt, params, leave_after=None):
        outs = []
        async for out in front.generate(rid, prompt, params):
            outs.append(out)
            if leave_after is not None and len(outs) == leave_after:
                break  # the client went away
        return outs

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)  # time under test: how often the loop gets to run during model steps

        tick = asyncio.create_task(ticker())
        full = asyncio.create_task(collect("full", prompts[2], RequestParams(max_tokens=NEW)))
        gone = asyncio.create_task(collect("gone", prompts[4], RequestParams(max_tokens=NEW), leave_after=2))
        cancelled = asyncio.create_task(collect("cancelled", prompts[5], RequestParams(max_tokens=NEW)))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="need 1 or more token ids"):
            await collect("bad", [], RequestParams())
        while not engine.stats().num_running:
            await asyncio.sleep(0.001)
        cancelled.cancel()
        outs, gone_outs = await full, await gone
        for _ in range(100):  # the disconnects' aborts are applied between steps
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        tick.cancel()
        await front.shutdown()
        return outs, gone_outs, ticks

    outs, gone_outs, ticks = asyncio.run(main())
    assert [t for o in outs for t in o.new_token_ids] == reference[2]
    assert outs[-1].finish_reason in ("stop", "length") and all(o.finish_reason is None for o in outs[:-1])
    assert outs[-1].completion_tokens == len(reference[2]) and outs[-1].prompt_tokens == LENGTHS[2]
    assert len(gone_outs) == 2 and not engine.has_unfinished()
    if engine.prefix is not None:
        engine.prefix.clear()  # cached prefixes hold blocks until evicted
    assert engine.kv.usage().used_blocks == 0 and engine.kv.usage().used_slots == 0
    assert ticks > len(outs)  # the event loop kept running while model steps ran in a thread


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
def test_prefix_cache_hits_give_the_outputs_of_a_cold_cache(model, prompts, seed):
    """Later requests extend earlier ones (multi-turn) or share their start: with the cache they reuse its states
    (cached_tokens > 0, partly filled blocks and open compressor windows included) and give the same tokens."""
    base = prompts[-1]  # 200 tokens
    V = model.config.vocab_size
    tail = torch.randint(3, V, (37,), generator=torch.Generator().manual_seed(99)).tolist()
    turns = [base[:70], base[:150] + tail, base + tail[:5], base[:70] + tail]
    params = RequestParams(max_tokens=NEW, temperature=0.0 if seed is None else 0.8, seed=seed, ignore_eos=True)
    results = {}
    for on in (False, True):
        engine = Engine(model, cache=CacheConfig(block_size=4, enable_prefix_caching=on, prefix_block_tokens=16),
                        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=48))
        got, cached = [], []
        for i, p in enumerate(turns):  # one after another, as turns of a conversation arrive
            engine.add_request(f"t{i}", p, params)
            tokens, n = [], 0
            while engine.has_unfinished():
                for out in engine.step():
                    tokens += out.new_token_ids
                    n = out.cached_tokens
                engine.kv.manager.check()
            got.append(tokens)
            cached.append(n)
        results[on] = got
        if on:
            assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
            assert engine.stats().prefix_cache_hits == sum(cached)
            engine.prefix.clear()
            assert engine.kv.usage().used_blocks == 0
    assert results[True] == results[False]
