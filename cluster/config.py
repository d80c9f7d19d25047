"""The deployment config: what `moemesh serve CONFIG` runs. The same pydantic model builds the app from Python and
from YAML; unknown fields are refused, and every error names the field and quotes the bad value.

```yaml
model: tiny                 # a checkpoint directory, or `tiny` (the built-in model, written on first use)
attention: {replicas: 2}
experts: {shards: 3}        # or an explicit list with `experts: {layer: [ids]}` per shard
engram: {shards: 2}
ingress: {port: 8000}
```

Secrets never sit in this file unless you put them there: `ingress.api_keys_env` and `grpc_token_env` name
environment variables of the process that deploys (read here, in `IngressConfig.api_key_list` and
`DeploymentConfig.grpc_security`, and nowhere else). See docs/security.md.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from moemesh.actors.ingress.protocol import IngressLimits
from moemesh.cluster.control.policy import AutoscalingConfig
from moemesh.cluster.placement import Placement  # noqa: F401 - part of this module's public names
from moemesh.kernels.config import describe_validation_error
from moemesh.proto.auth import GrpcSecurity, TlsFiles

MIN_API_KEY_LENGTH = 16
SERVE_IMPORT_PATH = "moemesh.cluster.serve_entry:app_builder"  # a Serve config file's moemesh application
SERVE_ARGS_CONFIG_KEY = "config"  # Serve args key holding a config file path (DeploymentConfig has no such field)


class ConfigFileError(ValueError):
    """A deployment config that cannot be run; the message names the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttentionAutoscaling(_Strict):
    """The attention pool: extra ranks beside the fixed `attention.replicas`, one Serve deployment (`attention-pool`)
    that Serve's autoscaler sizes with moemesh's policy (cluster/serve/pool_policy.py, docs/serving.md). The ingress
    sends work to the pool once every fixed rank holds `target_queue_per_replica` sequences."""

    min_replicas: int = Field(0, ge=0, description="Pool replicas at least (0: the pool starts when first needed).")
    max_replicas: int = Field(4, ge=1, description="Pool replicas at most.")
    target_queue_per_replica: float | None = Field(
        None, gt=0, description="Sequences (running + waiting) per rank: fixed ranks take work up to it before the "
        "pool does, and the pool gets one replica per this many of its sequences. None: `attention.max_num_seqs`.")
    target_ttft_s: float | None = Field(None, gt=0, description="Add a pool replica while a pool replica's recent "
                                        "p90 time to first token exceeds this; None: queue depth only.")
    upscale_delay_s: float = Field(30.0, ge=0, description="A decision to grow must hold this long (Serve).")
    downscale_delay_s: float = Field(300.0, ge=0, description="A decision to shrink must hold this long (Serve).")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the replicas' queue and TTFT are averaged "
                                      "over (Serve), and the TTFT window each replica keeps.")
    drain_timeout_s: float = Field(60.0, ge=0, description="A replica being removed finishes its sequences for at "
                                   "most this long; the rest move to other ranks (re-admission).")

    @model_validator(mode="after")
    def _bounds(self) -> "AttentionAutoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class AttentionConfig(_Strict):
    """Attention workers: one replica is one data-parallel rank. `replicas` fixed ranks always run; `autoscaling`
    adds a pool of extra ranks that grows and shrinks with the queue (None: fixed ranks only)."""

    replicas: int = Field(1, ge=1, description="Data-parallel ranks (Serve replicas).")
    max_num_seqs: int = Field(32, ge=1, description="Sequences batched per step.")
    micro_batches: int = Field(2, ge=1, le=16, description="Micro-batches a step is split into (by sequence) so that "
                               "one's attention runs while another's tokens are at the expert shards; 1 = no "
                               "overlap (docs/serving.md).")
    kv_cache_blocks: int = Field(4096, ge=1, description="Blocks in each rank's paged KV store.")
    block_size: int = Field(16, ge=1, description="Rows per KV block.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype.")
    engram_cache_rows: int = Field(65536, ge=0, description="Hot Engram rows cached per rank (LRU); 0 = off.")
    placement: Placement = Field(default_factory=Placement, description="Resources per rank.")
    autoscaling: AttentionAutoscaling | None = Field(None, description="The attention pool (extra ranks sized by "
                                                     "Serve's autoscaler); None: the fixed ranks only.")

    def target_queue(self) -> float:
        """Sequences per rank the pool policy and the ingress's spill aim at."""
        a = self.autoscaling
        return float(self.max_num_seqs if a is None or a.target_queue_per_replica is None
                     else a.target_queue_per_replica)


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
    batch_wait_ms: float = Field(0.0, ge=0, description="Extra wait of an idle shard for more requests of a layer "
                                 "(0: none; requests arriving while it computes are merged anyway).")
    max_batch_tokens: int = Field(8192, ge=1, description="Tokens per merged expert batch.")
    decoded_cache: float = Field(0.2, ge=0, le=8, description="Decoded experts a shard keeps for reuse, as a fraction "
                                 "of its packed expert bytes (a float32 expert is 8x its FP4 bytes); the step's "
                                 "micro-batches bring each layer twice. 0: decode every time.")
    placement: Placement = Field(default_factory=Placement, description="Resources per shard.")
    autoscaling: AutoscalingConfig | None = Field(None, description="The expert controller: replicas of hot "
                                                  "experts added and removed with load (docs/autoscaling.md); "
                                                  "None: the shards above only.")
    transport: Literal["grpc", "collective"] = Field(
        "grpc", description="How the fixed attention workers reach the shards above: `grpc`, or `collective`: one "
        "process group of those shards and workers (nccl on cuda, hccl on npu, gloo on cpu), gRPC for everything "
        "else and as the fallback (docs/wire.md, \"Collective transport\").")
    collective_port: int = Field(0, ge=0, le=65535, description="Port of the group's rendezvous store, hosted by "
                                 "expert shard 0 on `grpc_host`; 0: a free port (reported through its handle).")
    collective_timeout_s: float = Field(60.0, gt=0, description="How long the rendezvous may take; a member that "
                                        "cannot join in time uses gRPC only.")

    @model_validator(mode="after")
    def _one_way(self) -> "ExpertsConfig":
        if (self.shards is None) == (self.assignment is None):
            raise ValueError("set exactly one of `shards` (a count) and `assignment` (a list)")
        return self

    def shard_placements(self) -> list[Placement]:
        """Each shard's placement (an assignment entry's own, else `placement`), in shard order."""
        if self.assignment is None:
            return [self.placement] * self.shards
        return [spec.placement or self.placement for spec in self.assignment]

    def collective_backend(self) -> str:
        """The process group backend for `transport: collective`: by the shards' device."""
        return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[self.placement.device]

    def resolve(self, moe_layers: list[int], n_experts: int) -> list[dict[int, list[int]]]:
        """Per shard {layer: experts}; checks every expert of every MoE layer is held somewhere."""
        if self.assignment is None:
            return [{layer: list(range(s, n_experts, self.shards)) for layer in moe_layers}
                    for s in range(self.shards)]
        sets = [spec.experts for spec in self.assignment]
        for i, held in enumerate(sets):
            for layer, ids in held.items():
                bad = [e for e in ids if not 0 <= e < n_experts]
                if layer not in moe_layers or bad:
                    raise ConfigFileError(f"experts.assignment[{i}].experts: layer {layer} / experts {bad or ids} "
                                          f"out of range (layers {moe_layers[0]}..{moe_layers[-1]}, "
                                          f"experts 0..{n_experts - 1})")
        for layer in moe_layers:
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
    """The HTTP front: address, served name, API keys and request limits (docs/api.md, docs/security.md)."""

    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    model_name: str | None = Field(None, description="Name served at /v1/models (default: the model dir's name).")
    limits: IngressLimits = Field(default_factory=IngressLimits, description="Request limits, concurrency and "
                                  "back-pressure (see docs/api.md).")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys accepted on /v1/*; with none "
                                      "here and no `api_keys_env`, the API is open. Prefer `api_keys_env`.")
    api_keys_env: str | None = Field(None, description="Name of an environment variable (of the deploying process) "
                                     "holding comma-separated API keys, added to `api_keys`; it must be set.")
    public_metrics: bool = Field(False, description="Serve /metrics and /metrics/targets without an API key (for a "
                                 "Prometheus that cannot send one); they need one by default when keys are set.")

    @model_validator(mode="after")
    def _keys_are_sound(self) -> "IngressConfig":  # a model validator: the error never echoes a key
        for i, key in enumerate(self.api_keys):
            if not _sound_key(key.get_secret_value()):
                raise ValueError(f"api_keys[{i}]: {_KEY_RULE}")
        return self

    def api_key_list(self) -> list[str]:
        """The keys to accept: `api_keys` plus those in `$api_keys_env`, de-duplicated (empty: no auth)."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_env is not None:
            value = os.environ.get(self.api_keys_env, "")
            if not value.strip():
                raise ConfigFileError(f"ingress.api_keys_env: the environment variable {self.api_keys_env!r} is "
                                      "not set or empty")
            for i, key in enumerate(k.strip() for k in value.split(",") if k.strip()):
                if not _sound_key(key):
                    raise ConfigFileError(f"ingress.api_keys_env: key {i} of ${self.api_keys_env}: {_KEY_RULE}")
                keys.append(key)
        return list(dict.fromkeys(keys))


_KEY_RULE = f"a key must be at least {MIN_API_KEY_LENGTH} printable characters without spaces or commas"


def _sound_key(key: str) -> bool:
    """Long enough to resist guessing, and nothing a header or the comma-separated env var would mangle."""
    return len(key) >= MIN_API_KEY_LENGTH and key.isprintable() and not any(c.isspace() or c == "," for c in key)


class GrpcTlsConfig(_Strict):
    """TLS for internal gRPC (expert and Engram shards and their clients). PEM files, at the same paths on every
    node (each node may hold its own); checked here on the deploying machine, read by each process at start."""

    cert_file: str = Field(description="Certificate chain this process presents (servers; clients too if mutual).")
    key_file: str = Field(description="Private key of `cert_file`.")
    ca_file: str = Field(description="CA that signed the servers' (and, if mutual, the clients') certificates.")
    mutual: bool = Field(False, description="Servers require client certificates signed by `ca_file`.")
    server_name: str | None = Field(None, description="Name clients expect in the servers' certificate instead of "
                                    "the dialled address (one certificate for every node, e.g. `moemesh.internal`).")

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _pem_file(cls, v: str) -> str:
        path = Path(v).expanduser()
        if not path.is_file():
            raise ValueError(f"no such file: {v!r}")
        try:
            head = path.read_bytes()[:65536]
        except OSError as e:
            raise ValueError(f"cannot read {v!r}: {e.strerror}") from None
        if b"-----BEGIN " not in head:
            raise ValueError(f"{v!r} is not a PEM file")
        return str(path.resolve())

    def files(self) -> TlsFiles:
        return TlsFiles(self.cert_file, self.key_file, self.ca_file, self.mutual, self.server_name)


class DeploymentConfig(_Strict):
    """A whole moemesh deployment."""

    model: str = Field("tiny", description="Checkpoint directory, or a built-in model's name (`tiny`, "
                       "`v4-flash-mini`, `v4.1-flash-mini`; written to the cache on first use).")
    attention: AttentionConfig = Field(default_factory=AttentionConfig, description="Attention workers.")
    experts: ExpertsConfig = Field(default_factory=lambda: ExpertsConfig(shards=2), description="Expert shards.")
    engram: EngramConfig = Field(default_factory=EngramConfig, description="Engram memory service.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP front.")
    grpc_host: str = Field("127.0.0.1", description="Address internal gRPC servers bind to (the node's address).")
    grpc_token_env: str | None = Field(None, description="Name of an environment variable (of the deploying "
                                       "process) holding the cluster token every internal gRPC call carries; unset: "
                                       "a random token is generated at each deploy.")
    grpc_tls: GrpcTlsConfig | None = Field(None, description="TLS for internal gRPC; None: plaintext.")

    @model_validator(mode="after")
    def _one_device_per_group(self) -> "DeploymentConfig":
        """A collective group computes on one device kind: every shard and attention worker on it."""
        if self.experts.transport == "collective":
            want = self.experts.placement.device
            devices = {"attention.placement.device": self.attention.placement.device}
            devices.update({f"experts.assignment[{i}].placement.device": spec.placement.device
                            for i, spec in enumerate(self.experts.assignment or []) if spec.placement is not None})
            for field, device in devices.items():
                if device != want:
                    raise ValueError(f"{field}: {device!r}, but experts.transport 'collective' needs the device of "
                                     f"experts.placement.device ({want!r}) on every member of the group")
        return self

    def grpc_security(self) -> GrpcSecurity:
        """The cluster token (from `$grpc_token_env`, else a fresh `secrets.token_urlsafe(32)`) and TLS files."""
        if self.grpc_token_env is None:
            token = secrets.token_urlsafe(32)
        else:
            token = os.environ.get(self.grpc_token_env, "").strip()
            if not _sound_key(token):
                raise ConfigFileError(f"grpc_token_env: ${self.grpc_token_env} must be set; {_KEY_RULE}")
        return GrpcSecurity(token=token, tls=self.grpc_tls.files() if self.grpc_tls else None)

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
        if data and "applications" in data:
            return cls._from_serve_file(data, path)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_serve_args(cls, args: dict | None, source: str = "serve args",
                        base_dir: Path | None = None) -> "DeploymentConfig":
        """The config a Serve application's `args` describe (cluster/serve_entry.py): the fields inline, or
        `{config: PATH}` and nothing else (a relative PATH is read from `base_dir`, else the working directory)."""
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ConfigFileError(f"{source}: expected a mapping, got {type(args).__name__}")
        if SERVE_ARGS_CONFIG_KEY not in args:
            return cls.from_dict(args, source=source)
        others = sorted(k for k in args if k != SERVE_ARGS_CONFIG_KEY)
        if others:
            raise ConfigFileError(f"{source}: `{SERVE_ARGS_CONFIG_KEY}` (a file) excludes inline fields; got also "
                                  f"{others}")
        path = args[SERVE_ARGS_CONFIG_KEY]
        if not isinstance(path, str) or not path:
            raise ConfigFileError(f"{source}.{SERVE_ARGS_CONFIG_KEY}: expected the path of a deployment config "
                                  f"file, got {path!r}")
        return cls.from_yaml(path if base_dir is None else Path(base_dir) / path)

    @classmethod
    def _from_serve_file(cls, data: dict, path: Path) -> "DeploymentConfig":
        """A Ray Serve config file (what `serve deploy` takes): the args of its moemesh application, with
        `http_options.host/port` as the ingress address."""
        apps = [a for a in data.get("applications") or []
                if isinstance(a, dict) and a.get("import_path") == SERVE_IMPORT_PATH]
        if len(apps) != 1:
            raise ConfigFileError(f"{path}: applications: expected exactly one with import_path "
                                  f"{SERVE_IMPORT_PATH!r}, found {len(apps)}")
        config = cls.from_serve_args(apps[0].get("args"), source=f"{path}: applications[].args",
                                     base_dir=path.parent)
        http = data.get("http_options") or {}
        ingress = {k: http[k] for k in ("host", "port") if k in http}
        if ingress:
            try:
                config = config.model_copy(update={"ingress": IngressConfig.model_validate(
                    {**config.ingress.model_dump(), **ingress})})
            except ValidationError as e:
                raise ConfigFileError(f"{path}: http_options: {describe_validation_error(e)}") from None
        return config

