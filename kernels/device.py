"""Device backends: which torch device a role computes on, what that device can do, and which kernel path runs there.

Three backends. `cpu`: the plain-torch reference (the oracle every fast path is tested against). `cuda`: NVIDIA GPUs;
Triton kernels (kernels/triton_*.py) when triton imports, else the reference ops on the GPU. `npu`: Huawei Ascend via
`torch_npu` + CANN; torch_npu fused operators (kernels/npu_ops.py) where they fit, the reference elsewhere.

`torch_npu` is imported here and only here, and only when an NPU is asked for (`resolve_device("npu")`,
`load_torch_npu()`): without Huawei's CANN libraries it fails to load, and a CPU or GPU role must not depend on it.

Environment variables (read in this module and nowhere else in kernels/):
- `MOEMESH_KERNELS`: `auto` (default: the fastest path for the device) or `reference` (plain torch ops everywhere,
  e.g. to bisect a numerical difference on a GPU). Any other value is an error.
- `CUDA_VISIBLE_DEVICES` / `ASCEND_RT_VISIBLE_DEVICES`: read by the CUDA / CANN runtimes themselves (Ray sets them for
  actors holding `GPU` / `NPU` resources); reported by `describe`, never changed here.
- `TORCH_DEVICE_BACKEND_AUTOLOAD` (torch's own): torch >= 2.5 imports installed device backends such as torch_npu at
  `import torch` unless it is `0`. Set it to `0` for roles that must not load torch_npu on a host where it is
  installed; `load_torch_npu` still imports it explicitly when an NPU is requested.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import resource
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

KernelPath = Literal["reference", "triton", "torch_npu"]
BACKENDS = ("cpu", "cuda", "npu")
_NPU_INSTALL = ("install the `ascend` extra (pip install 'moemesh[ascend]'; pick the torch_npu release matching your "
                "torch and CANN versions) on a machine with Ascend NPUs and the CANN toolkit")


class DeviceUnavailable(RuntimeError):
    """The requested device or backend does not exist here; the message says what is missing and how to get it."""


def kernels_mode() -> Literal["auto", "reference"]:
    """`MOEMESH_KERNELS` (see the module docstring)."""
    mode = os.environ.get("MOEMESH_KERNELS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "reference"):
        raise ValueError(f"MOEMESH_KERNELS: expected 'auto' or 'reference', got {mode!r}")
    return mode  # type: ignore[return-value]


# ---- torch_npu, imported only on request -----------------------------------------------------------------------------
def torch_npu_installed() -> bool:
    """Whether a torch_npu package is present (does not import it)."""
    return "torch_npu" in sys.modules or importlib.util.find_spec("torch_npu") is not None


def load_torch_npu():
    """Import torch_npu (registers the `npu` device and `torch.npu`), or raise DeviceUnavailable saying why."""
    if "torch_npu" in sys.modules:
        return sys.modules["torch_npu"]
    if not torch_npu_installed():
        raise DeviceUnavailable(f"device 'npu' requested but torch_npu is not installed: {_NPU_INSTALL}")
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, OSError, RuntimeError) as e:  # typically libascendcl.so & co. missing: CANN not set up
        raise DeviceUnavailable(
            f"device 'npu' requested; torch_npu is installed but failed to load ({type(e).__name__}: {e}). Is the "
            "CANN toolkit installed and its environment sourced (e.g. `source "
            "/usr/local/Ascend/ascend-toolkit/set_env.sh`), and does the torch_npu build match torch "
            f"{torch.__version__}?") from e


# ---- resolving a device ----------------------------------------------------------------------------------------------
def resolve_device(spec: str | torch.device = "cpu") -> torch.device:
    """`cpu`, `cuda[:i]`, `npu[:i]` or `auto` -> a torch.device that exists here, or DeviceUnavailable.

    `auto` picks CUDA if available, else an NPU if torch_npu is installed and sees one, else the CPU. Indices count
    visible devices only (`CUDA_VISIBLE_DEVICES` / `ASCEND_RT_VISIBLE_DEVICES`, which Ray sets per actor)."""
    kind, index = _parse(spec)
    if kind == "auto":
        return _auto_device()
    if kind == "cpu":
        return torch.device("cpu")
    return _cuda_device(index) if kind == "cuda" else _npu_device(index)


def _parse(spec: str | torch.device) -> tuple[str, int | None]:
    if isinstance(spec, torch.device):
        kind, index = spec.type, spec.index
    else:
        kind, _, idx = str(spec).strip().lower().partition(":")
        index = int(idx) if idx.isdigit() else -1 if idx else None
    if kind not in (*BACKENDS, "auto") or index == -1 or (kind in ("auto", "cpu") and index):
        raise ValueError(f"device: expected one of {list(BACKENDS)} (optionally with ':index') or 'auto', "
                         f"got {spec!r}")
    return kind, index


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch_npu_installed():
        try:
            return _npu_device(None)
        except DeviceUnavailable:
            pass
    return torch.device("cpu")


def _cuda_device(index: int | None) -> torch.device:
    name = "cuda" if index is None else f"cuda:{index}"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise DeviceUnavailable(f"device {name!r} requested but this torch ({torch.__version__}) is a CPU-only "
                                "build: install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} requested but no CUDA GPU is visible (torch "
                                f"{torch.__version__}, CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); check nvidia-smi and "
                                "that the role was given GPUs (`placement.num_gpus`)")
    index = torch.cuda.current_device() if index is None else index
    if index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are "
                                "visible")
    return torch.device("cuda", index)


def _npu_device(index: int | None) -> torch.device:
    name = "npu" if index is None else f"npu:{index}"
    torch_npu = load_torch_npu()
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "<unset>")
    if not torch_npu.npu.is_available():
        raise DeviceUnavailable(f"device {name!r} requested; torch_npu loaded but sees no NPU "
                                f"(ASCEND_RT_VISIBLE_DEVICES={visible!r}); check npu-smi and that the role was given "
                                "NPUs (`placement.resources: {NPU: 1}`)")
    index = torch_npu.npu.current_device() if index is None else index
    count = torch_npu.npu.device_count()
    if index >= count:
        raise DeviceUnavailable(f"device {name!r} requested but only {count} NPU(s) are visible "
                                f"(ASCEND_RT_VISIBLE_DEVICES={visible!r})")
    return torch.device("npu", index)


# ---- what a device can do --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports (it needs a CUDA build of torch to launch, but imports anywhere it is installed)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def kernel_path(device: torch.device) -> KernelPath:
    """The kernel family the dispatchers (kernels/fast_paths.py) use for tensors on `device`."""
    if device.type == "cpu" or kernels_mode() == "reference":
        return "reference"
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "npu":
        return "torch_npu"
    return "reference"


@dataclass(frozen=True)
class Capabilities:
    """Facts about one device that decide dtypes and kernel paths (docs/hardware.md has the matrix)."""

    device: str  # e.g. "cuda:0"
    name: str  # e.g. "NVIDIA H100 80GB HBM3", the NPU's SoC name, "cpu"
    kernel_path: KernelPath
    bf16: bool  # bf16 compute is native (not emulated)
    quantized_experts: bool  # packed FP8/FP4 expert weights are consumed as stored (dequantized per tile in-kernel)
    fp8: bool  # FP8 e4m3 weights can be decoded in-kernel (CUDA sm_89+: Ada, Hopper, Blackwell)
    compute_capability: tuple[int, int] | None = None  # CUDA only


def capabilities(device: str | torch.device) -> Capabilities:
    """Capabilities of a device (a string is resolved first, so a missing backend raises DeviceUnavailable)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    path = kernel_path(dev)
    if dev.type == "cuda":
        cc = torch.cuda.get_device_capability(dev)
        return Capabilities(str(dev), torch.cuda.get_device_name(dev), path, bf16=cc >= (8, 0),
                            quantized_experts=path == "triton", fp8=path == "triton" and cc >= (8, 9),
                            compute_capability=cc)
    if dev.type == "npu":  # torch_npu's grouped matmul takes float16/bfloat16 (and int8/int4), not FP8/FP4 blocks
        name = load_torch_npu().npu.get_device_name(dev.index or 0)
        return Capabilities(str(dev), name, path, bf16=True, quantized_experts=False, fp8=False)
    return Capabilities("cpu", "cpu", path, bf16=True, quantized_experts=False, fp8=False)


# ---- runtime helpers -------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (no-op on the CPU): call before reading a wall clock."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def memory_stats(device: torch.device) -> dict[str, int]:
    """Bytes: `allocated` / `reserved` / `peak_allocated` by torch's caching allocator and the device's `free` /
    `total` (accelerators); on the CPU, the process's peak resident set `peak_rss` and `total` RAM."""
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {"peak_rss": peak, "total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    mod = getattr(torch, device.type)  # torch.cuda, or torch.npu once torch_npu is loaded
    free, total = mod.mem_get_info(device)
    return {"allocated": mod.memory_allocated(device), "reserved": mod.memory_reserved(device),
            "peak_allocated": mod.max_memory_allocated(device), "free": free, "total": total}


def describe(device: torch.device) -> str:
    """One line for logs and benchmark reports: device, name, kernel path, versions, visible devices."""
    caps = capabilities(device)
    parts = [f"{caps.device} ({caps.name})", f"kernels: {caps.kernel_path}", f"torch {torch.__version__}"]
    if caps.compute_capability:
        parts.append(f"sm_{caps.compute_capability[0]}{caps.compute_capability[1]}, CUDA {torch.version.cuda}")
    if caps.kernel_path == "triton":
        parts.append(f"triton {importlib.import_module('triton').__version__}")
    if device.type == "npu":
        parts.append(f"torch_npu {getattr(load_torch_npu(), '__version__', '?')}")
    for var in ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"):
        if var in os.environ:
            parts.append(f"{var}={os.environ[var]}")
    return ", ".join(parts)


# ---- what this machine has ------------------------------------------------------------------------------------------
def local_accelerators() -> dict[str, float]:
    """{"GPU": n, "NPU": n} this machine's torch can use (what a local Ray would offer). torch_npu is imported only
    when it is installed, and a broken install (no CANN) counts as no NPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    npus = 0
    if torch_npu_installed():
        try:
            load_torch_npu()
            npus = torch.npu.device_count()
        except DeviceUnavailable:
            npus = 0
    return {"GPU": float(gpus), "NPU": float(npus)}
