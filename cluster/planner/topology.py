"""The cluster as the planner sees it: devices, hosts, and nested high-bandwidth domains with per-tier links.

Two forms:
- `TopologySpec`: the compact, validated description a preset file holds (`deploy/topologies/*.yaml`): one device
  kind, one host kind, tiers with domain sizes, a device count. Numbers take units (`141 GB`, `4.8 TB/s`,
  `400 Gb/s`, `1979 TFLOP/s`, `2 us`).
- `Topology`: the expansion into per-device arrays (what the planner reads). `TopologySpec.expand()` builds it from a
  preset; `topology_from_ray_nodes()` builds it from a live Ray cluster's node list plus a preset for device facts.

Tiers, innermost first. Tier t's domains partition the devices, each tier-t domain lies inside one tier-(t+1)
domain, and the last tier spans the cluster. Two different devices talk over the innermost tier whose domain holds
both. `bandwidth` is per device and per direction: what one device can send (and, at the same time, receive) across
that tier. Tiers on the same `fabric` share those links (their times add); different fabrics run in parallel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

LABEL_PREFIX = "moemesh.io/"        # Ray node label (or custom resource `moemesh.io/<tier>:<id>`) naming a domain
NODE_TIER = "node"                  # a tier named `node` is one Ray node: it needs no label
PRESET_DIR = Path(__file__).resolve().parents[2] / "deploy" / "topologies"  # the repository root's deploy/


class TopologyError(ValueError):
    """A topology description that cannot be used; the message names the field and the bad value."""


# ---- quantities with units -----------------------------------------------------------------------------------------
_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
       "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(\S*)\s*$")
_EXAMPLE = {"bytes": "141 GB", "rate": "900 GB/s or 400 Gb/s", "flops": "989 TFLOP/s", "time": "2 us"}


def _unit_scale(unit: str, kind: str) -> float | None:
    if kind == "time":
        return _TIME.get(unit)
    if kind == "flops":
        m = re.fullmatch(r"([kKMGTPE]?)FLOP(?:/s|S)", unit)
        return _SI[m.group(1)] if m else None
    if kind == "bytes":
        m = re.fullmatch(r"([kKMGTPE]i?)?B", unit)
        return _SI[m.group(1) or ""] if m else None
    m = re.fullmatch(r"([kKMGTPE]i?)?(B|b)(?:/s|ps)", unit)    # rate: B = bytes, b = bits
    return _SI[m.group(1) or ""] / (8.0 if m.group(2) == "b" else 1.0) if m else None


def parse_quantity(value, kind: Literal["bytes", "rate", "flops", "time"]) -> float:
    """A number, or a string with a unit, in base units (bytes, bytes/s, FLOP/s, seconds).
    `parse_quantity("400 Gb/s", "rate") == 50e9`; bare numbers are taken as base units already."""
    if isinstance(value, bool):
        raise ValueError(f"expected a {kind} quantity such as {_EXAMPLE[kind]!r}, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _NUMBER.match(str(value))
    scale = _unit_scale(m.group(2), kind) if m else None
    if scale is None:
        raise ValueError(f"cannot read {value!r} as {kind} (expected e.g. {_EXAMPLE[kind]!r})")
    return float(m.group(1)) * scale


Bytes = Annotated[float, BeforeValidator(lambda v: parse_quantity(v, "bytes"))]
Rate = Annotated[float, BeforeValidator(lambda v: parse_quantity(v, "rate"))]
Flops = Annotated[float, BeforeValidator(lambda v: parse_quantity(v, "flops"))]
Seconds = Annotated[float, BeforeValidator(lambda v: parse_quantity(v, "time"))]


# ---- the compact description ---------------------------------------------------------------------------------------
class DeviceSpec(BaseModel):
    """One accelerator (all devices of a preset are alike)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="Device model, e.g. `H200-SXM` or `Ascend-950DT`.")
    ray_resource: Literal["GPU", "NPU"] = Field("GPU", description="Ray resource that counts these devices.")
    memory: Bytes = Field(gt=0, description="Device memory (HBM), bytes.")
    flops: Flops = Field(gt=0, description="Dense FLOP/s at the precision the experts run in (FP8 where supported).")
    hbm_bandwidth: Rate = Field(gt=0, description="Device memory bandwidth, bytes/s.")


class HostSpec(BaseModel):
    """One host (a Ray node): CPUs with DRAM, holding `devices` accelerators."""

    model_config = ConfigDict(extra="forbid")
    devices: int = Field(gt=0, description="Accelerators per host.")
    dram: Bytes = Field(gt=0, description="Host DRAM, bytes (the Engram service's tables live here).")


class TierSpec(BaseModel):
    """One level of the interconnect: devices in the same domain of this tier (and not of an inner one) use it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$", description="Tier name, e.g. `node`, `cabinet`, `supernode`, "
                      "`domain`, `network`. On Ray, domains of tier X come from label `moemesh.io/X` (`node`: the "
                      "Ray node itself).")
    devices: int | None = Field(None, gt=0, description="Devices per domain of this tier; omit on the last tier "
                                "(it spans the cluster).")
    fabric: str = Field(description="Physical network this tier uses; tiers on one fabric share its bandwidth.")
    bandwidth: Rate = Field(gt=0, description="Per device, per direction, bytes/s (e.g. `450 GB/s`, `400 Gb/s`).")
    latency: Seconds = Field(ge=0, description="One-way latency of a message over this tier, seconds (e.g. `2 us`).")


class TopologySpec(BaseModel):
    """A preset: a uniform cluster described by counts. `expand()` turns it into per-device arrays."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Preset name.")
    description: str = Field("", description="One line for humans.")
    devices: int = Field(gt=0, description="Total accelerators (`moemesh plan --devices N` resizes).")
    device: DeviceSpec = Field(description="The accelerator.")
    host: HostSpec = Field(description="The host (Ray node).")
    tiers: list[TierSpec] = Field(min_length=1, description="Interconnect tiers, innermost first.")

    @model_validator(mode="after")
    def _sizes_nest(self) -> "TopologySpec":
        names = [t.name for t in self.tiers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tiers: duplicate tier name(s) {dup}")
        for i, t in enumerate(self.tiers[:-1]):
            if t.devices is None:
                raise ValueError(f"tiers[{i}].devices: required on every tier but the last ({t.name!r})")
        last = self.tiers[-1]
        if last.devices not in (None, self.devices):
            raise ValueError(f"tiers[{len(self.tiers) - 1}].devices: the last tier spans the cluster; got "
                             f"{last.devices}, devices is {self.devices} (omit it)")
        sizes = [self.host.devices] + [t.devices or self.devices for t in self.tiers]
        where = ["host.devices"] + [f"tiers[{i}].devices" for i in range(len(self.tiers))]
        for (a, wa), (b, wb) in zip(zip(sizes, where), zip(sizes[1:], where[1:])):
            if b % a:
                raise ValueError(f"{wb}: {b} is not a multiple of {wa} {a}")
        return self

    def resized(self, devices: int) -> "TopologySpec":
        """The same preset with another device count (the last tier grows with it)."""
        data = self.model_dump()
        data["devices"] = devices
        data["tiers"][-1]["devices"] = None
        return validate_spec(data, source=f"{self.name} resized to {devices}")

    def expand(self) -> "Topology":
        """Per-device arrays: device i lives in host i // host.devices and in domain i // tier.devices of each tier."""
        idx = np.arange(self.devices)
        sizes = [t.devices or self.devices for t in self.tiers]
        return self.with_layout(self.name, idx // self.host.devices, np.stack([idx // s for s in sizes]))

    def with_layout(self, name: str, host: np.ndarray, domain: np.ndarray,
                    host_names: tuple[str, ...] = ()) -> "Topology":
        """A `Topology` of this preset's devices, hosts and tiers on a given layout: host [D] and domain [T, D] ids."""
        D = len(host)
        return Topology(
            name=name, kind=np.full(D, self.device.kind), memory=np.full(D, self.device.memory),
            flops=np.full(D, self.device.flops), hbm_bandwidth=np.full(D, self.device.hbm_bandwidth), host=host,
            host_dram=np.full(int(host[-1]) + 1 if D else 0, self.host.dram),
            tier_names=tuple(t.name for t in self.tiers), tier_fabric=tuple(t.fabric for t in self.tiers),
            tier_bandwidth=np.array([t.bandwidth for t in self.tiers]),
            tier_latency=np.array([t.latency for t in self.tiers]), domain=domain, host_names=host_names)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or repr(value) in msg else f" (got {value!r})"
    return f"{loc}: {msg}{shown}" if loc else msg


def validate_spec(data, source: str = "topology") -> TopologySpec:
    """A `TopologySpec` from a dict; errors name the field and the value (`TopologyError`)."""
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: expected a mapping of topology fields, got {type(data).__name__}")
    try:
        return TopologySpec.model_validate(data)
    except ValidationError as e:
        raise TopologyError(f"{source}: {_first_error(e)}") from None


def load_topology_spec(path_or_name: str | Path) -> TopologySpec:
    """Read a preset: a YAML path, or the name of one in deploy/topologies/ (`hgx-h200`, `atlas950-superpod`, ...)."""
    path = Path(path_or_name)
    if not path.exists() and not path.suffix:
        path = PRESET_DIR / f"{path_or_name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise TopologyError(f"topology: no file {str(path_or_name)!r} and no preset of that name (presets: {known})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TopologyError(f"{path}: not valid YAML ({e})") from None
    return validate_spec(data, source=str(path))


def load_topology(path_or_name: str | Path, devices: int | None = None) -> "Topology":
    """`load_topology_spec` + optional resize + `expand`."""
    spec = load_topology_spec(path_or_name)
    return (spec.resized(devices) if devices else spec).expand()


# ---- the expanded form ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Topology:
    """Per-device arrays. D = devices, H = hosts, T = tiers (innermost first).

    Devices are numbered so that every host and every tier domain is a contiguous range of device ids, with ids
    0, 1, 2, ... in device order (`domain[t]` and `host` are non-decreasing); `__post_init__` checks it."""

    name: str
    kind: np.ndarray            # [D] str   device model
    memory: np.ndarray          # [D] bytes of device memory
    flops: np.ndarray           # [D] dense FLOP/s
    hbm_bandwidth: np.ndarray   # [D] bytes/s
    host: np.ndarray            # [D] host id
    host_dram: np.ndarray       # [H] bytes
    tier_names: tuple[str, ...]
    tier_fabric: tuple[str, ...]
    tier_bandwidth: np.ndarray  # [T] bytes/s per device per direction
    tier_latency: np.ndarray    # [T] seconds
    domain: np.ndarray          # [T, D] domain id of each device at each tier
    host_names: tuple[str, ...] = field(default=())

    def __post_init__(self):
        D, T = len(self.memory), len(self.tier_names)
        if self.domain.shape != (T, D):
            raise TopologyError(f"domain: shape {self.domain.shape}, expected {(T, D)}")
        for name, ids in [("host", self.host)] + [(f"tier {n!r}", d) for n, d in zip(self.tier_names, self.domain)]:
            steps = np.diff(ids)
            if D and (ids[0] != 0 or ((steps != 0) & (steps != 1)).any()):
                raise TopologyError(f"{name}: domain ids must be 0, 1, 2, ... over contiguous device ranges")
        inner = self.host
        for name, ids in zip(self.tier_names, self.domain):
            if (np.diff(ids) > np.diff(inner)).any():
                raise TopologyError(f"tier {name!r}: a domain splits a host or an inner-tier domain")
            inner = ids
        if D and self.domain[-1].max() != 0:
            raise TopologyError(f"tier {self.tier_names[-1]!r}: the last tier must span the cluster")
        if len(self.host_dram) != (self.host.max() + 1 if D else 0):
            raise TopologyError(f"host_dram: {len(self.host_dram)} entries for {self.host.max() + 1} hosts")

    @property
    def n_devices(self) -> int:
        return len(self.memory)

    @property
    def n_hosts(self) -> int:
        return len(self.host_dram)

    @property
    def n_tiers(self) -> int:
        return len(self.tier_names)

    def n_domains(self, tier: int) -> int:
        return int(self.domain[tier, -1]) + 1

    def pair_tier(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Link tier between devices a and b (arrays): 0 = same device, t + 1 = topology tier t."""
        out = np.full(np.broadcast(a, b).shape, self.n_tiers, dtype=np.int64)
        for t in range(self.n_tiers - 1, -1, -1):
            out = np.where(self.domain[t][a] == self.domain[t][b], t + 1, out)
        return np.where(a == b, 0, out)

    def active_tiers(self) -> list[int]:
        """Tiers that can carry traffic: their domains hold more than one inner domain (or device)."""
        counts = [self.n_devices] + [self.n_domains(t) for t in range(self.n_tiers)]
        return [t for t in range(self.n_tiers) if counts[t + 1] < counts[t]]

    def slowest_tier(self) -> int:
        """The active tier with the least bandwidth (the outermost on a tie); -1 when no tier is active."""
        active = self.active_tiers()
        return min(active, key=lambda t: (self.tier_bandwidth[t], -t)) if active else -1

    def summary(self) -> str:
        kinds = ", ".join(sorted(set(self.kind.tolist())))
        tiers = " < ".join(f"{n} ({self.n_domains(t)}, {self.tier_bandwidth[t] / 1e9:g} GB/s)"
                           for t, n in enumerate(self.tier_names))
        return f"{self.name}: {self.n_devices:,} x {kinds} on {self.n_hosts:,} hosts; tiers {tiers}"


def domain_starts(ids: np.ndarray) -> np.ndarray:
    """[n] index of the first element of each domain, for `ids` a non-decreasing array of domain ids (a device
    partition such as `Topology.host` or `Topology.domain[t]`, or the domain of each of a sorted list of devices)."""
    return np.flatnonzero(np.r_[True, np.diff(ids) > 0])


# ---- discovery from a live Ray cluster -----------------------------------------------------------------------------
def _node_domain(node: dict, tier: str) -> str | None:
    """Domain of a Ray node at `tier`: label `moemesh.io/<tier>`, else custom resource `moemesh.io/<tier>:<id>`."""
    key = LABEL_PREFIX + tier
    value = (node.get("Labels") or {}).get(key)
    if value is not None:
        return str(value)
    found = [r[len(key) + 1:] for r in (node.get("Resources") or {}) if r.startswith(key + ":")]
    return found[0] if len(found) == 1 else None


def topology_from_ray_nodes(nodes: list[dict], preset: TopologySpec | str | Path) -> Topology:
    """A `Topology` from `ray.nodes()` (a list of dicts with `NodeID`, `Alive`, `Resources`, `Labels`).

    Devices: each alive node's `preset.device.ray_resource` count (`GPU` or `NPU`). Domains: for every preset tier
    but the last, label `moemesh.io/<tier>` or custom resource `moemesh.io/<tier>:<id>` (tier `node` is the Ray node
    itself). Device facts, host DRAM and tier links come from `preset`. Nodes are ordered outermost domain first."""
    spec = preset if isinstance(preset, TopologySpec) else load_topology_spec(preset)
    res, tiers = spec.device.ray_resource, spec.tiers
    rows = []
    for node in nodes:
        count = int((node.get("Resources") or {}).get(res, 0))
        if not node.get("Alive", True) or count <= 0:
            continue
        node_id = str(node.get("NodeID", ""))
        where = f"node {node.get('NodeManagerAddress', '?')} ({node_id[:12]})"
        keys = []
        for t in tiers[:-1]:
            value = node_id if t.name == NODE_TIER else _node_domain(node, t.name)
            if value is None:
                raise TopologyError(f"{where}: no label {LABEL_PREFIX}{t.name} (or custom resource "
                                    f"{LABEL_PREFIX}{t.name}:<id>); the cluster config must set it")
            keys.append(value)
        rows.append((tuple(reversed(keys)), node_id, count))
    if not rows:
        raise TopologyError(f"ray nodes: no alive node has a {res!r} resource")
    rows.sort()
    # A domain name must sit under one outer domain (a label reused across supernodes is a config mistake).
    for t in range(len(tiers) - 2):
        outer_of: dict[str, str] = {}
        for keys, _, _ in rows:
            inner, outer = keys[len(keys) - 1 - t], keys[len(keys) - 2 - t]
            if outer_of.setdefault(inner, outer) != outer:
                raise TopologyError(f"label {LABEL_PREFIX}{tiers[t].name}={inner!r} appears in two "
                                    f"{tiers[t + 1].name} domains ({outer_of[inner]!r} and {outer!r})")
    counts = np.array([c for _, _, c in rows])
    host = np.repeat(np.arange(len(rows)), counts)
    domain = []
    for t in range(len(tiers)):
        keys = [k[:len(k) - t] for k, _, _ in rows]        # outermost key down to tier t
        ids = np.cumsum([i > 0 and keys[i] != keys[i - 1] for i in range(len(keys))])
        domain.append(np.repeat(ids, counts))
    return spec.with_layout(f"{spec.name} (ray)", host, np.stack(domain), tuple(n for _, n, _ in rows))
