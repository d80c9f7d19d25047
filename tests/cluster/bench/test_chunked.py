"""`moemesh bench chunked` on a small case: chunking spreads the long prompt over steps, with the running streams
getting a token at each, and changes no token (the timings themselves are the benchmark's, not asserted here)."""

import moemesh
from moemesh.cluster.bench.chunked import measure


def test_chunking_shortens_the_longest_decode_gap_and_keeps_the_tokens(tiny_model_dir):
    model = moemesh.load_model(tiny_model_dir)
    whole = measure(model, False, None, streams=2, decode_tokens=12, long_len=600, arrive_at=3)
    chunked = measure(model, True, 64, streams=2, decode_tokens=12, long_len=600, arrive_at=3)
    assert whole.tokens == chunked.tokens and len(whole.tokens["long"]) == 1
    assert len(chunked.tpot_ms) == len(whole.tpot_ms) > 0
    # unchunked: the whole prefill in one step that every running stream waits for (two when the prefix cache cuts
    # it at its last 64-token boundary, docs/scheduling.md)
    assert whole.long_steps <= 2
    assert chunked.long_steps >= 600 // 64  # spread over budget-sized steps (the decode tokens go first)
