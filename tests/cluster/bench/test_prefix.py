"""`moemesh bench prefix` on a small workload: the cache-on run reuses the shared system prompt and the history, and
both runs give the same tokens (the timing numbers themselves are the benchmark's, not checked here)."""

from __future__ import annotations

import moemesh
from moemesh.cluster.bench.prefix import Workload, markdown, measure


def test_the_cache_on_run_hits_and_gives_the_same_tokens(tiny_model_dir):
    model = moemesh.load_model(tiny_model_dir)
    work = Workload(conversations=2, turns=2, system_len=64, user_len=8, max_tokens=4)
    best = measure(model, work, repeats=1)
    off, on = best[False], best[True]
    assert [t.tokens for t in off] == [t.tokens for t in on] and all(len(t.tokens) == 4 for t in on)
    assert all(t.cached_tokens == 0 for t in off)
    assert on[0].cached_tokens == 0 and on[1].cached_tokens == 64  # conversation 1 finds the system prompt
    assert all(t.cached_tokens >= 64 for t in on[2:])  # later turns: at least the system prompt
    text = markdown(best, work, "tiny", "cpu", "test machine", "moemesh bench prefix")
    assert text.startswith("## Prefix caching (`moemesh bench prefix`)") and "Same tokens with and without the " \
        "cache: yes" in text
