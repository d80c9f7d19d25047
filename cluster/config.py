"""The deployment config: what `moemesh serve CONFIG` runs. The same pydantic model builds the app from Python and
from YAML; unknown fields are refused, and every error names the field and quotes the bad value.

```yaml
model: tiny                 # a checkpoint directory, or `tiny` (the built-in model, written on first use)
attention: {replicas: 2}
experts: {shards: 3}        # or an explicit list with `experts: {layer: [ids]}` per shard
engram: {shards: 2}
ingress: {port: 8000}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moemesh.kernels.config import describe_validation_error


class ConfigFileError(ValueError):
    """A deployment config that cannot be run; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Placement(_Strict):
    """Where a role's processes may run: Ray resources each process asks for (a custom resource that only some
    nodes carry, e.g. `{"expert_node": 0.01}`, pins the role to those nodes)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs each process reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each process reserves (the `GPU` resource).")
    resources: dict[str, float] = Field(default_factory=dict, description="Other Ray resources, e.g. NPU or markers.")
    device: Literal["cpu", "cuda", "npu"] = Field("cpu", description="Torch device the role computes on.")

    def ray_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


class AttentionConfig(_Strict):
    """Attention workers: one replica is one data-parallel rank."""

    replicas: int = Field(1, ge=1, description="Data-parallel ranks (Serve replicas).")
    max_num_seqs: int = Field(32, ge=1, description="Sequences batched per step.")
    kv_cache_blocks: int = Field(4096, ge=1, description="Blocks in each rank's paged KV store.")
    block_size: int = Field(16, ge=1, description="Rows per KV block.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype.")
    engram_cache_rows: int = Field(65536, ge=0, description="Hot Engram rows cached per rank (LRU); 0 = off.")
    placement: Placement = Field(default_factory=Placement, description="Resources per rank.")


class ShardSpec(_Strict):
    """One expert shard: the routed experts it holds, by MoE layer."""

    experts: dict[int, list[int]] = Field(description="{layer: [expert ids]} held by this shard.")
    placement: Placement | None = Field(None, description="Overrides `experts.placement` for this shard.")

    @field_validator("experts")
    @classmethod
    def _non_empty(cls, v: dict[int, list[int]]) -> dict[int, list[int]]:
        if not v or not any(v.values()):
            raise ValueError(f"a shard must hold at least one expert, got {v!r}")
        return v


class ExpertsConfig(_Strict):
    """Expert shards: either `shards: N` (experts of every layer dealt round-robin over N shards) or an explicit
    `assignment` list. Experts may appear in several shards (replicas)."""

    shards: int | None = Field(None, ge=1, description="Number of shards for an automatic assignment.")
    assignment: list[ShardSpec] | None = Field(None, description="Explicit per-shard expert sets.")
    batch_wait_ms: float = Field(2.0, ge=0, description="How long a shard waits to merge requests of one layer.")
    max_batch_tokens: int = Field(8192, ge=1, description="Tokens per merged expert batch.")
    placement: Placement = Field(default_factory=Placement, description="Resources per shard.")

    @model_validator(mode="after")
    def _one_way(self) -> "ExpertsConfig":
        if (self.shards is None) == (self.assignment is None):
            raise ValueError("set exactly one of `shards` (a count) and `assignment` (a list)")
        return self

    def resolve(self, n_layers_moe: list[int], n_experts: int) -> list[dict[int, list[int]]]:
        """Per shard {layer: experts}; checks every expert of every MoE layer is held somewhere."""
        if self.assignment is None:
            return [{layer: list(range(s, n_experts, self.shards)) for layer in n_layers_moe}
                    for s in range(self.shards)]
        sets = [spec.experts for spec in self.assignment]
        for i, held in enumerate(sets):
            for layer, ids in held.items():
                bad = [e for e in ids if not 0 <= e < n_experts]
                if layer not in n_layers_moe or bad:
                    raise ConfigFileError(f"experts.assignment[{i}].experts: layer {layer} / experts {bad or ids} "
                                          f"out of range (layers {n_layers_moe[0]}..{n_layers_moe[-1]}, "
                                          f"experts 0..{n_experts - 1})")
        for layer in n_layers_moe:
            missing = sorted(set(range(n_experts)) - {e for held in sets for e in held.get(layer, [])})
            if missing:
                raise ConfigFileError(f"experts.assignment: layer {layer} experts {missing} are held by no shard")
        return sets


class EngramConfig(_Strict):
    """The Engram memory service: tables sharded by row ranges over `shards` actors, each `replicas` times."""

    shards: int = Field(2, ge=1, description="Actors the tables are split over (by row ranges).")
    replicas: int = Field(1, ge=1, description="Copies of each shard.")
    mmap_dir: str | None = Field(None, description="Write tables here at load and memory-map them (else in RAM).")
    placement: Placement = Field(default_factory=Placement, description="Resources per Engram actor.")


class IngressConfig(_Strict):
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    model_name: str | None = Field(None, description="Name served at /v1/models (default: the model dir's name).")
    limits: dict = Field(default_factory=dict, description="Request limits (see docs/api.md).")


class DeploymentConfig(_Strict):
    """A whole moemesh deployment."""

    model: str = Field("tiny", description="Checkpoint directory, or `tiny` for the built-in model.")
    attention: AttentionConfig = Field(default_factory=AttentionConfig, description="Attention workers.")
    experts: ExpertsConfig = Field(default_factory=lambda: ExpertsConfig(shards=2), description="Expert shards.")
    engram: EngramConfig = Field(default_factory=EngramConfig, description="Engram memory service.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP front.")
    grpc_host: str = Field("127.0.0.1", description="Address internal gRPC servers bind to (the node's address).")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "DeploymentConfig":
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigFileError(f"{source}: {describe_validation_error(e)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DeploymentConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigFileError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigFileError(f"{path}: not valid YAML ({e})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigFileError(f"{path}: expected a mapping at the top, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

