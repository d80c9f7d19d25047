"""moemesh: serve DeepSeek-V4-class Mixture-of-Experts models across a Ray cluster.

The public facade. `load_model` is the single-process reference path: offline use, and the oracle the distributed
runtime is tested against. It is imported on first use, so processes that only need `moemesh.cluster` helpers (the
local node provider inside Ray's autoscaler, `ray stop` wrappers) do not load torch.
"""

from moemesh.proto.build import ensure_stubs as _ensure_stubs

__all__ = ["load_model", "__version__"]
__version__ = "0.1.0"

# A source checkout regenerates missing or outdated gRPC stubs before any `moemesh.proto.*_pb2` import (standard
# library only; an installed wheel is left alone). Here because the code folders have no __init__.py (pyproject.toml).
_ensure_stubs()


def __getattr__(name: str):
    if name == "load_model":
        from moemesh.kernels.model import load_model

        return load_model
    raise AttributeError(f"module 'moemesh' has no attribute {name!r}")
