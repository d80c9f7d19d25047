"""Expert and Engram shards as Serve replicas: the Ray-side hosts (cluster/serve/hosts.py) plus the role edge."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from torch.distributed import TCPStore

from moemesh.cluster.serve.collective import CollectiveSpec
from moemesh.cluster.serve.edge import RoleEdge
from moemesh.cluster.serve.hosts import EngramShardHost, ExpertShardHost, bind_address

log = logging.getLogger(__name__)


class ExpertShardReplica(RoleEdge, ExpertShardHost):
    """An expert shard; with `collective` (base shards only) it also joins the group as `rank`, in the background
    (the workers join once every shard's constructor returned), and serves the workers over it beside gRPC."""

    def __init__(self, model_dir: str, assignment: dict, host: str, collective: CollectiveSpec | None = None,
                 rank: int = 0, store_handle=None, **kw):
        ExpertShardHost.__init__(self, model_dir, assignment, host, **kw)
        self.metrics_address = self.start_metrics(host)
        self._store, self._store_address = None, ""
        if collective is not None and collective.first_start(rank):
            if store_handle is None:  # shard 0: the rendezvous store lives as long as this process
                bound = bind_address(host)
                self._store = TCPStore(bound, collective.port, None, True, timedelta(seconds=collective.timeout_s),
                                       wait_for_workers=False)
                self._store_address = f"{bound}:{self._store.port}"
            threading.Thread(target=self._join_collective, args=(collective, rank, store_handle),
                             name="moemesh-collective", daemon=True).start()

    def collective_store(self) -> str:
        """`host:port` of the group's rendezvous store ("" if this process hosts none: not shard 0, or restarted)."""
        return self._store_address

    def _join_collective(self, spec: CollectiveSpec, rank: int, store_handle) -> None:
        try:
            address = self._store_address or store_handle.collective_store.remote().result(timeout_s=spec.timeout_s)
        except Exception as e:  # noqa: BLE001 - gRPC only
            log.warning("collective group %s: no store address from shard 0 (%r); gRPC only", spec.group_id, e)
            return
        group = spec.join(rank, address) if address else None
        if group is not None:
            self.serve_collective(group, range(spec.shards, spec.world_size))


class EngramShardReplica(RoleEdge, EngramShardHost):
    def __init__(self, model_dir: str, ranges: dict, host: str, **kw):
        EngramShardHost.__init__(self, model_dir, ranges, host, **kw)
        self.metrics_address = self.start_metrics(host)

