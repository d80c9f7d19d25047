"""Process hosts: a shard (expert or Engram) loaded from the checkpoint and served over gRPC from an I/O loop thread.

Plain classes: the builder (cluster/serve/app.py) turns them into Serve deployments (one replica = one process); tests
can run them in-process. A host reports its gRPC address; attention workers then talk to it directly, never through Ray.
`security` (proto/auth.py) is the cluster token every call must carry and the TLS files; default neither.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from functools import partial

import torch

from moemesh.actors.engram.server import serve_engram_shard
from moemesh.actors.engram.service import EngramShard
from moemesh.actors.experts.server import serve_expert_shard
from moemesh.actors.experts.shard import BatchingConfig, ExpertShard, process_memory
from moemesh.actors.io_loop import IoLoop
from moemesh.actors.role_metrics import EngramShardCollector, ExpertShardCollector, role_registry, serve_registry
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.device import resolve_device
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.collective import CollectiveShardServer
from moemesh.proto.collective_link import CollectiveGroup


def bind_address(host: str) -> str:
    """`node` means this Ray node's address (a real cluster); anything else is used as given (127.0.0.1 by default,
    so a one-machine cluster never leaves loopback)."""
    if host != "node":
        return host
    import ray  # only at the edge, and only when asked for

    return ray.util.get_node_ip_address()


class _GrpcHost:
    """Owns the I/O loop and the server; subclasses build the shard and start the right service."""

    def __init__(self, name: str):
        self.io = IoLoop(name)
        self.server, self.address = None, ""

    def _serve(self, start, shard, host: str, port: int, security: GrpcSecurity | None) -> None:
        bound = bind_address(host)
        self.server, port = self.io.run(start(shard, bound, port, security=security))
        self.address = f"{bound}:{port}"

    def grpc_address(self) -> str:
        return self.address

    def _start_metrics(self, host: str, collector) -> str:
        """Serve this process's Prometheus metrics (from `collector`) on a free port; returns `host:port`."""
        registry = role_registry()
        registry.register(collector)
        return serve_registry(registry, bind_address(host))

    def shutdown(self) -> None:
        if self.server is not None:
            self.io.run(self.server.stop(1.0))
            self.server = None
        self.io.close()

    def __del__(self):  # Serve tears replicas down by dropping them
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


class ExpertShardHost(_GrpcHost):
    """One expert shard process: `{layer: [expert ids]}` loaded selectively from the checkpoint. `expert_map_version`:
    the first map version it is part of (a replica started by the expert controller)."""

    def __init__(self, model_dir: str, assignment: Mapping[int, Sequence[int]], host: str = "127.0.0.1",
                 port: int = 0, dtype: str = "float32", device: str = "cpu", batching: dict | None = None,
                 security: GrpcSecurity | None = None, expert_map_version: int = 0):
        self.empty_rss_bytes = process_memory()["rss_bytes"]  # this process before it loads any expert
        super().__init__("expert-shard-io")
        self.collective: CollectiveShardServer | None = None
        device = resolve_device(device)  # a clear DeviceUnavailable here, not a torch error mid-load
        ckpt = Checkpoint(model_dir)
        self.shard = ExpertShard.from_loader(ckpt.config, {int(k): list(v) for k, v in assignment.items()},
                                             partial(ckpt.read_experts, dequantize=False),  # kept packed
                                             dtype=getattr(torch, dtype), device=device,
                                             batching=BatchingConfig(**(batching or {})),
                                             expert_map_version=expert_map_version)
        self._serve(serve_expert_shard, self.shard, host, port, security)

    def serve_collective(self, group: CollectiveGroup, peers: Sequence[int]) -> None:
        """Also serve the attention workers `peers` (ranks of `group`) over collectives, beside gRPC, on the same I/O
        loop (so their requests batch with the gRPC ones). Call once; the gRPC server keeps running regardless."""
        self.collective = CollectiveShardServer(self.shard, group, peers)
        asyncio.run_coroutine_threadsafe(self.collective.serve(), self.io.loop)

    def start_metrics(self, host: str) -> str:
        return self._start_metrics(host, ExpertShardCollector(self.shard))

    def memory(self) -> dict[str, int]:
        """{expert_bytes (packed expert weights held), scratch_bytes (decode buffers and decoded experts kept),
        rss_bytes, peak_rss_bytes} of this shard process (`ExpertShard.memory`), and empty_rss_bytes: its RSS when it
        started, before loading any expert (Ray, Serve and torch already in)."""
        return {**self.shard.memory(), "empty_rss_bytes": self.empty_rss_bytes}

    def stats(self) -> dict:
        c = self.shard.counters
        return {"address": self.address, "requests": c.requests, "batches": c.batches, "tokens": c.tokens,
                "compute_s": c.compute_s,
                "collective_requests": self.collective.requests if self.collective is not None else None}

    def shutdown(self) -> None:
        if self.collective is not None:  # CLOSE to the workers, which move to gRPC
            self.io.run(self.collective.stop(), timeout=5)
            self.collective = None
        super().shutdown()

    def check_health(self) -> None:
        """Serve's health check: raising marks the replica unhealthy (and Serve replaces it)."""
        if not self.shard.serving:
            raise RuntimeError(f"expert shard at {self.address} is closed")


class EngramShardHost(_GrpcHost):
    """One Engram shard process: its row ranges of every Engram layer's table, optionally memory-mapped."""

    def __init__(self, model_dir: str, ranges: Mapping[int, Sequence[int]], host: str = "127.0.0.1", port: int = 0,
                 mmap_dir: str | None = None, security: GrpcSecurity | None = None):
        super().__init__("engram-shard-io")
        rows = {int(layer): (int(r[0]), int(r[1])) for layer, r in ranges.items()}
        self.shard = EngramShard.from_checkpoint(model_dir, rows, mmap_dir=mmap_dir)
        self._serve(serve_engram_shard, self.shard, host, port, security)

    def start_metrics(self, host: str) -> str:
        return self._start_metrics(host, EngramShardCollector(self.shard))

    def stats(self) -> dict:
        return {"address": self.address, **vars(self.shard.counters)}

    def check_health(self) -> None:
        if not self.shard.serving:
            raise RuntimeError(f"Engram shard at {self.address} is closed")
