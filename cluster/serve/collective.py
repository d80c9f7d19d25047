"""The collective transport's group (opt-in, `experts.transport: collective`) as the builders set it up: ranks, the
rendezvous store, first-start bookkeeping in Ray's KV."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass

from moemesh.cluster.names import (
    COLLECTIVE_KV_NAMESPACE,
)
from moemesh.proto.collective_link import CollectiveGroup, init_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectiveSpec:
    """One process group of the base expert shards (ranks 0..shards-1) and the fixed attention workers (ranks
    shards..world_size-1), made at build time. Shard 0 hosts the rendezvous store and reports its address through
    its handle (`collective_store`). `group_id` is fresh per build: a process joins only on its first start (a
    restarted one cannot rejoin a static group, so it uses gRPC only), which a key per rank in Ray's KV records."""

    group_id: str
    backend: str
    world_size: int
    shards: int
    port: int
    timeout_s: float

    def first_start(self, rank: int) -> bool:
        """True the first time `rank`'s process asks (it joins the group); False after any restart."""
        from ray.experimental import internal_kv

        return not internal_kv._internal_kv_put(f"{self.group_id}/{rank}", "1", overwrite=False,
                                                namespace=COLLECTIVE_KV_NAMESPACE)

    def join(self, rank: int, store_address: str) -> CollectiveGroup | None:
        """`init_group` on a daemon thread, waited for at most `timeout_s` + 10 s (a rendezvous that never completes
        must not hold the process) -> the group, or None (logged: this process uses gRPC only)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        host, port = store_address.rsplit(":", 1)

        def run() -> None:
            try:
                done.set_result(init_group(rank, self.world_size, host, int(port), self.backend,
                                           timeout_s=self.timeout_s, is_master=False))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                done.set_exception(e)
        threading.Thread(target=run, name="moemesh-collective-join", daemon=True).start()
        try:
            return done.result(self.timeout_s + 10)
        except Exception as e:  # noqa: BLE001 - the deployment still works over gRPC
            log.warning("collective group %s: rank %d could not join (%r); using gRPC only", self.group_id, rank, e)
            return None

