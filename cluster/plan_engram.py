"""Engram tables -> hosts (step 5 of the planner): each domain of the smallest level that can hold the tables in its
hosts' Engram DRAM gets full copies, cut into column-range shards over all its hosts, so that lookups stay inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moemesh.cluster.plan_place import _first_devices
from moemesh.cluster.plan_shape import ModelShape
from moemesh.cluster.topology import Topology

if TYPE_CHECKING:
    from moemesh.cluster.planner import MemoryBudget


class EngramError(ValueError):
    """The hosts' DRAM cannot hold the Engram tables."""


@dataclass(frozen=True, eq=False)
class EngramPlacement:
    """Engram tables -> hosts: each domain of `level` holds `copies` full copies, each cut into `n_shards`
    column-range shards on distinct hosts. host[j, c, i]: host of shard i of copy c in domain j."""

    level: str
    n_shards: int
    shard_bytes: float
    host: np.ndarray           # [domains, copies, n_shards]
    host_bytes: np.ndarray     # [H]


def place_engram(topo: Topology, shape: ModelShape, memory: MemoryBudget) -> EngramPlacement | None:
    """Each domain of the smallest level (host, then each tier) whose every domain fits `engram_copies` full
    copies in its hosts' Engram DRAM holds those copies, each spread over all its hosts in column-range shards."""
    B = shape.engram_table_bytes
    if B <= 0:
        return None
    budget = topo.host_dram * memory.engram_dram_fraction
    first_dev = _first_devices(topo.host)
    levels = [("host", np.arange(topo.n_hosts))] + [(n, topo.domain[t][first_dev])
                                                    for t, n in enumerate(topo.tier_names)]
    C = memory.engram_copies
    for name, dom in levels:                                                  # dom: [H] domain of each host
        n_hosts = np.bincount(dom)
        low = np.minimum.reduceat(budget, _first_devices(dom))
        if (C * B <= n_hosts * low).all() and (C <= n_hosts).all():
            m = int(n_hosts.min())
            first = _first_devices(dom)
            host = first[:, None, None] + (np.arange(C)[None, :, None] + np.arange(m)[None, None, :]) % m
            host_bytes = np.bincount(host.ravel(), minlength=topo.n_hosts) * (B / m)
            return EngramPlacement(name, m, B / m, host, host_bytes)
    raise EngramError(f"engram: {C} cop{'y' if C == 1 else 'ies'} of the {B / 1e9:.0f} GB Engram tables do not "
                      f"fit: the cluster's hosts offer {budget.sum() / 1e9:.0f} GB at engram_dram_fraction="
                      f"{memory.engram_dram_fraction}")
