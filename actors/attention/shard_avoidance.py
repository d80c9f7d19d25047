"""Which expert shards an attention worker currently avoids, and how it finds out that they are back.

A shard whose dispatch failed with UNAVAILABLE is marked down: the expert map then routes the experts it shares with
healthy shards elsewhere, and only experts nobody else holds still go to it (their tokens wait, see `Dispatcher`).
While it is down a background probe re-resolves its address (a shard restarted by Serve may listen on a new port)
and asks its health service every `probe_interval_s`; the first SERVING answer (or a dispatch it answers) marks it
up again. Every incident is recorded with wall-clock times (`events`) so recovery can be measured from outside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Hashable

from pydantic import BaseModel, ConfigDict, Field

from moemesh.proto.transport import ExpertTransport

log = logging.getLogger(__name__)


class RecoveryConfig(BaseModel):
    """How long and how often a worker waits for an expert shard that stopped answering."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    deadline_s: float = Field(90.0, gt=0, description="Longest a layer's dispatch waits for a shard to come back.")
    backoff_s: float = Field(0.2, gt=0, description="First pause before asking a down shard again (doubles).")
    max_backoff_s: float = Field(2.0, gt=0, description="Longest pause between two tries.")
    probe_interval_s: float = Field(1.0, gt=0, description="Health probes of a down shard, this often.")
    probe_timeout_s: float = Field(2.0, gt=0, description="Deadline of one probe (address lookup, health check).")
    max_probe_s: float = Field(1800.0, gt=0, description="Probing of one incident stops after this long.")


class ShardHealth:
    """Down shards, their incidents and their probes (all on the worker's I/O loop)."""

    def __init__(self, transport: ExpertTransport, config: RecoveryConfig | None = None, max_events: int = 256):
        self.transport, self.config = transport, config or RecoveryConfig()
        self.events: deque[dict] = deque(maxlen=max_events)  # bounded: the last incidents only
        self._down: dict[Hashable, dict] = {}  # shard -> its open incident (an entry of `events`)
        self._probes: dict[Hashable, asyncio.Task] = {}

    @property
    def down(self) -> frozenset:
        return frozenset(self._down)

    def mark_down(self, shard: Hashable, error: BaseException) -> None:
        """`shard` failed a dispatch: avoid it and start probing it (once per incident)."""
        if shard in self._down:
            return
        log.warning("expert shard %r is unavailable (%s); avoiding it until it answers again", shard, error)
        incident = {"shard": str(shard), "down_at": time.time(), "recovered_at": None, "how": None,
                    "healthy_at": None}
        self._down[shard] = incident
        self.events.append(incident)
        self._probes[shard] = asyncio.ensure_future(self._probe(shard))

    def recovered(self, shards: set, rerouted: bool) -> None:
        """A dispatch round that had failed completed: stamp each open incident of `shards` once."""
        now = time.time()
        for shard in shards:
            incident = self._down.get(shard)
            if incident is not None and incident["recovered_at"] is None:
                incident["recovered_at"], incident["how"] = now, "rerouted" if rerouted else "restarted"

    def answered(self, shard: Hashable) -> None:
        """`shard` answered a dispatch: it is up."""
        if shard in self._down:
            self._mark_up(shard)

    def _mark_up(self, shard: Hashable) -> None:
        incident = self._down.pop(shard)
        incident["healthy_at"] = time.time()
        if incident["recovered_at"] is None:
            incident["recovered_at"], incident["how"] = incident["healthy_at"], "restarted"
        probe = self._probes.pop(shard, None)
        if probe is not None and probe is not asyncio.current_task():
            probe.cancel()
        log.warning("expert shard %r answers again", shard)

    async def _probe(self, shard: Hashable) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + cfg.max_probe_s
        while shard in self._down and loop.time() < stop_at:
            await asyncio.sleep(cfg.probe_interval_s)
            if await self.transport.health(shard, cfg.probe_timeout_s):
                if shard in self._down:
                    self._mark_up(shard)
                return
            await self.transport.refresh(shard, cfg.probe_timeout_s)

    async def close(self) -> None:
        probes, self._probes = list(self._probes.values()), {}
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
