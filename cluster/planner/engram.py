"""Engram tables -> hosts (step 5 of the planner): each domain of the smallest level that can hold the tables in its
hosts' Engram DRAM gets full copies, cut into column-range shards over all its hosts, so that lookups stay inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moemesh.cluster.planner.shape import ModelShape
from moemesh.cluster.planner.topology import Topology, domain_starts

if TYPE_CHECKING:
    from moemesh.cluster.planner.plan import MemoryBudget


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


def host_levels(topo: Topology) -> dict[str, np.ndarray]:
    """The levels an Engram placement may use, smallest first: {"host" or tier name: [H] domain of each host}."""
    first_dev = domain_starts(topo.host)
    return {"host": np.arange(topo.n_hosts), **{n: topo.domain[t][first_dev] for t, n in enumerate(topo.tier_names)}}


def place_engram(topo: Topology, shape: ModelShape, memory: MemoryBudget) -> EngramPlacement | None:
    """Each domain of the smallest level (host, then each tier) whose every domain fits `engram_copies` full
    copies in its hosts' Engram DRAM holds those copies, each spread over all its hosts in column-range shards."""
    B = shape.engram_table_bytes
    if B <= 0:
        return None
    budget = topo.host_dram * memory.engram_dram_fraction
    C = memory.engram_copies
    for name, dom in host_levels(topo).items():                               # dom: [H] domain of each host
        n_hosts, first = np.bincount(dom), domain_starts(dom)
        low = np.minimum.reduceat(budget, first)
        if (C * B <= n_hosts * low).all() and (C <= n_hosts).all():
            m = int(n_hosts.min())
            host = first[:, None, None] + (np.arange(C)[None, :, None] + np.arange(m)[None, None, :]) % m
            host_bytes = np.bincount(host.ravel(), minlength=topo.n_hosts) * (B / m)
            return EngramPlacement(name, m, B / m, host, host_bytes)
    raise EngramError(f"engram: {C} cop{'y' if C == 1 else 'ies'} of the {B / 1e9:.0f} GB Engram tables do not "
                      f"fit: the cluster's hosts offer {budget.sum() / 1e9:.0f} GB at engram_dram_fraction="
                      f"{memory.engram_dram_fraction}")
