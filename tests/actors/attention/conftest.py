"""Helpers shared by the attention-worker tests."""

from __future__ import annotations

import pytest


def _greedy_outputs(model, step_fn, prompts, max_tokens, block_size=4) -> dict[str, list[int]]:
    """Every prompt through one continuous-batching `Engine` (its forward pass `step_fn`, default the model's own)
    with greedy decoding and eos ignored -> {request id: new token ids}."""
    from moemesh.actors.attention.engine import CacheConfig, Engine
    from moemesh.actors.attention.scheduler import SchedulerConfig
    from moemesh.actors.request import RequestParams

    engine = Engine(model, CacheConfig(block_size=block_size), SchedulerConfig(max_num_seqs=8), model_step=step_fn)
    got: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, RequestParams(max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got


@pytest.fixture
def greedy_outputs():
    return _greedy_outputs
