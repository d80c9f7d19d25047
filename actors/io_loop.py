"""`IoLoop`: an asyncio event loop on its own daemon thread. Every process that serves or calls gRPC from synchronous
code keeps its channels and servers there (the attention worker's clients, the shard hosts' servers)."""

from __future__ import annotations

import asyncio
import threading


class IoLoop:
    """An asyncio loop on its own daemon thread, for a worker's network clients."""

    def __init__(self, name: str = "moemesh-io"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        """Run `coro` on the loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
