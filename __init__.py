"""moemesh: serve DeepSeek-V4-class Mixture-of-Experts models across a Ray cluster.

The public facade. `load_model` is the single-process reference path: offline use, and the oracle the distributed
runtime is tested against.
"""

from moemesh.kernels.model import load_model

__all__ = ["load_model", "__version__"]
__version__ = "0.1.0"
