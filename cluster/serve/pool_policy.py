"""The attention pool's Serve autoscaling policy, and the stats its replicas report for it.

`attention-pool` (cluster/serve/app.py) is a Serve deployment whose replicas are extra data-parallel ranks; Serve sizes
it with `AttentionPoolPolicy`. Every replica reports, through Serve's `record_autoscaling_stats` hook:

- `QUEUE`: its sequences running + waiting (the ingress's `load()`);
- `TTFT`: the p90 of its times to first token over the last `look_back_period_s` (`RecentTtft`), 0 with none.

Serve averages each over `look_back_period_s` per replica (`ctx.aggregated_metrics`), calls the policy on its
controller loop and then applies, itself, the scaling factors, `upscale_delay_s` / `downscale_delay_s` (a decision
must hold that long before it is carried out) and the min/max bounds; from zero replicas it starts one as soon as a
request waits at a handle, without calling the policy. So the policy is one pure function of the context.

The ingress sends work to the pool only once every fixed rank holds `target_queue_per_replica` sequences (spill,
actors/ingress/generation.py), so the pool's queue is the overflow of the fixed ranks and the pool empties when they
suffice.

Serve pickles this module by value into its controller: keep it free of Ray and of moemesh imports.
"""

from __future__ import annotations

import math
import time
from collections import deque

POLICY_PATH = "moemesh.cluster.serve.pool_policy:AttentionPoolPolicy"
QUEUE = "queue"  # sequences running + waiting on one replica
TTFT = "ttft_p90_s"  # p90 time to first token on one replica, recent window (0: none)


class AttentionPoolPolicy:
    """Serve custom policy (a class: Serve instantiates it once with `policy_kwargs`, then calls it every control
    loop tick with an `AutoscalingContext`) -> (replicas wanted, policy state).

    Step 1: queue = the replicas' `QUEUE`; a running replica that has not reported yet counts as
    `target_queue_per_replica` (it just started: assume it is needed). Requests waiting at handles are left out:
    the engines queue what they cannot run (a replica takes 4 x max_num_seqs), and a handle reports its count every
    10 s, so after a cold start its stale "1 waiting" would add a replica nobody needs.
    Step 2: wanted = ceil(queue / target_queue_per_replica).
    Step 3: when `target_ttft_s` is set and a replica's recent p90 TTFT exceeds it, at least one more than now.
    Step 4: clamp to Serve's capacity-adjusted [min, max] replicas."""

    def __init__(self, target_queue_per_replica: float, target_ttft_s: float | None = None):
        if not target_queue_per_replica > 0:
            raise ValueError(f"target_queue_per_replica: must be > 0, got {target_queue_per_replica!r}")
        if target_ttft_s is not None and not target_ttft_s > 0:
            raise ValueError(f"target_ttft_s: must be > 0 or None, got {target_ttft_s!r}")
        self.target_queue, self.target_ttft_s = float(target_queue_per_replica), target_ttft_s

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        queues, ttfts = metrics.get(QUEUE, {}), metrics.get(TTFT, {})
        # Step 1
        silent = sum(1 for r in ctx.running_replicas if r not in queues)
        queue = sum(queues.values()) + silent * self.target_queue
        # Step 2 (a hair below each multiple of the target still fits: float noise from time-weighted averages)
        wanted = math.ceil(queue / self.target_queue - 1e-6)
        # Step 3
        ttft = max(ttfts.values(), default=0.0)
        slow = self.target_ttft_s is not None and ttft > self.target_ttft_s and ctx.current_num_replicas > 0
        if slow:
            wanted = max(wanted, ctx.current_num_replicas + 1)
        # Step 4
        wanted = max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, wanted))
        return wanted, {"queue": queue, "ttft_p90_s": ttft, "slow": slow}


class RecentTtft:
    """One replica's times to first token over the last `window_s` seconds -> their p90 (nearest rank; 0 with none).
    Kept bounded: at most `max_samples` of the most recent."""

    def __init__(self, window_s: float, max_samples: int = 4096, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (when, seconds)

    def add(self, seconds: float) -> None:
        self._samples.append((self.clock(), seconds))

    def p90(self) -> float:
        horizon = self.clock() - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        values = sorted(s for _, s in self._samples)
        return values[math.ceil(0.9 * len(values)) - 1]


def pool_stats(queue: float, ttft_p90_s: float) -> dict[str, float]:
    """What a pool replica's `record_autoscaling_stats` returns (Serve wants a flat dict of numbers)."""
    return {QUEUE: float(queue), TTFT: float(ttft_p90_s)}
