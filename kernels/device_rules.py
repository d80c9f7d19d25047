"""Placement rules about devices that need no torch (config validation runs in processes that never load it, e.g.
the local node provider inside Ray's autoscaler)."""

from __future__ import annotations


def check_device_resources(device: str, num_gpus: float, resources: dict[str, float]) -> None:
    """Ray hides devices a process did not ask for (CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES), so a device
    needs its resource, and a device resource needs the device (else it is held and never used). ValueError naming
    the field otherwise."""
    npus = resources.get("NPU", 0.0)
    if device == "cuda" and num_gpus <= 0:
        raise ValueError(f"device: 'cuda' needs num_gpus > 0 (Ray shows a process only the GPUs it asked for), "
                         f"got num_gpus={num_gpus:g}")
    if device == "npu" and npus <= 0:
        raise ValueError(f"device: 'npu' needs resources.NPU > 0 (Ray shows a process only the NPUs it asked for), "
                         f"got {resources!r}")
    if device == "cpu" and (num_gpus > 0 or npus > 0):
        raise ValueError(f"device: 'cpu' with num_gpus={num_gpus:g} / NPU={npus:g}: set device to 'cuda' or 'npu', "
                         "or drop the accelerator")
