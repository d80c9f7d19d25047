"""Does a replica help? Before/after numbers for every expert whose holders the controller changed.

For each change the controller records, from the same trailing windows that drive its decisions:
- **tokens/s per holder**: the expert's routed tokens per second divided by its holder count. Added capacity shows as
  the same total rate spread over more holders, and (when the expert was the bottleneck) a higher total rate;
- **dispatch latency to its holders**: the mean round trip of the messages that attention workers sent to the shards
  holding the expert (messages weighted), measured by the workers' dispatchers. A replica that added capacity lowers
  it; on one machine, where replicas share the same cores, it usually does not (docs/autoscaling.md).

"before" is taken when the change is applied (the window just ended, old holders); "after" at the first tick whose
whole window was measured after the new map was installed (new holders), so the two never share a sample. Pure
bookkeeping: no Ray, no asyncio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from moemesh.cluster.control.policy import Key, LoadMeter

Shard = str  # a base shard's position as a string ("0", "1", ...) or a replica actor's name


class LatencyMeter:
    """Cumulative per-worker `{shard: [messages, seconds]}` -> mean round-trip seconds to a set of shards over the
    trailing window (a worker whose counters went down restarted, as in LoadMeter)."""

    def __init__(self, window_s: float):
        self.messages, self.seconds = LoadMeter(window_s), LoadMeter(window_s)

    def add(self, now: float, snapshots: Mapping[str, Mapping[Shard, Iterable[float]]]) -> None:
        pairs = {w: {s: tuple(v) for s, v in per.items()} for w, per in snapshots.items()}
        self.messages.add(now, {w: {s: int(v[0]) for s, v in per.items()} for w, per in pairs.items()})
        self.seconds.add(now, {w: {s: float(v[1]) for s, v in per.items()} for w, per in pairs.items()})

    def mean_s(self, shards: Iterable[Shard]) -> float | None:
        """Mean round trip to `shards` over the window (None: no message answered by them in it)."""
        per_s, sec_per_s = self.messages.rates(), self.seconds.rates()
        shards = list(shards)
        n = sum(per_s.get(s, 0.0) for s in shards)
        return sum(sec_per_s.get(s, 0.0) for s in shards) / n if n > 0 else None


@dataclass
class Effect:
    """One change to an expert's holders and what it did. `*_after` stay None until a window has passed."""

    time: float  # wall-clock time of the change
    layer: int
    expert: int
    action: str  # add / remove / rebalance (as the decision)
    holders_before: int
    holders_after: int
    tokens_per_holder_before: float  # tok/s per holder
    latency_before_s: float | None  # mean dispatch round trip to the holders (None: no traffic)
    tokens_per_holder_after: float | None = None
    latency_after_s: float | None = None

    @property
    def settled(self) -> bool:
        return self.tokens_per_holder_after is not None


class EffectTracker:
    """The last change per expert (`current`) and the settled ones in order (`history`, bounded)."""

    def __init__(self, keep: int = 200):
        self.current: dict[Key, tuple[float, Effect]] = {}  # key -> (controller clock when installed, effect)
        self.history: deque[Effect] = deque(maxlen=keep)

    def changed(self, key: Key, effect: Effect, installed_at: float) -> None:
        """Record a change whose map was installed at `installed_at` (the controller's clock); a pending one for the
        same expert is superseded."""
        self.current[key] = (installed_at, effect)

    def settle(self, window_since: float | None, rates: Mapping[Key, float], holders: Mapping[Key, int],
               latency_of) -> list[Effect]:
        """Fill in "after" for changes installed before the current window's oldest sample (`window_since`);
        `latency_of(key)` -> mean seconds to its holders over that window. -> the effects settled by this call."""
        done = []
        for key, (at, effect) in self.current.items():
            if effect.settled or window_since is None or window_since <= at:
                continue
            effect.tokens_per_holder_after = rates.get(key, 0.0) / max(holders.get(key, 1), 1)
            effect.latency_after_s = latency_of(key)
            self.history.append(effect)
            done.append(effect)
        return done
