"""`Placement`: the Ray resources and torch device of one role's processes. Its own module (no actors/ imports), so
both the deployment config and the expert controller's replica settings can build on it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moemesh.kernels.device_rules import check_device_resources


class Placement(BaseModel):
    """Where a role's processes may run: Ray resources each process asks for (a custom resource that only some
    nodes carry, e.g. `{"expert_node": 0.01}`, pins the role to those nodes)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="CPUs each process reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each process reserves (the `GPU` resource).")
    resources: dict[str, float] = Field(default_factory=dict, description="Other Ray resources, e.g. NPU or markers.")
    device: Literal["cpu", "cuda", "npu"] = Field("cpu", description="Torch device the role computes on.")

    @model_validator(mode="after")
    def _device_has_its_resource(self) -> "Placement":
        check_device_resources(self.device, self.num_gpus, self.resources)
        return self

    def ray_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}
