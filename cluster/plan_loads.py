"""Expert-load files and synthetic skewed loads for the planner.

A load file holds tokens per expert: shape [layers, experts], or [ranks, layers, experts] when it says which
attention rank sent them. Only proportions matter to `moemesh plan`: it rescales each layer to the decode batch
(`--tokens-per-rank` tokens per rank, top-k experts each). Formats:
- `.npy`: the array itself (any float or int dtype);
- `.json`: `{"loads": [[...], ...]}` (or the bare nested list);
- `.safetensors`: a tensor named `loads`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def zipf_loads(layers: int, experts: int, exponent: float, total: float, seed: int = 0) -> np.ndarray:
    """[layers, experts]: expert of popularity rank i gets a share proportional to i**-exponent; each layer ranks
    its experts by an independent random permutation (`np.random.default_rng(seed)`); every layer sums to `total`."""
    if exponent < 0:
        raise ValueError(f"exponent: must be >= 0, got {exponent}")
    rng = np.random.default_rng(seed)
    w = np.arange(1, experts + 1, dtype=np.float64) ** -exponent
    out = np.stack([rng.permutation(w) for _ in range(layers)])
    return out / out.sum(1, keepdims=True) * total


def read_loads(path: str | Path) -> np.ndarray:
    """A load file (see the module docstring) as float64; errors name the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"loads: no file {str(path)!r}")
    if path.suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        data = data.get("loads") if isinstance(data, dict) else data
        if data is None:
            raise ValueError(f"{path}: expected a key 'loads' holding [layers][experts] numbers")
        try:
            x = np.array(data, dtype=np.float64)
        except (ValueError, TypeError):
            raise ValueError(f"{path}: 'loads' must be a rectangular nested list of numbers") from None
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "loads" not in tensors:
            raise ValueError(f"{path}: no tensor named 'loads' (found {sorted(tensors)})")
        x = tensors["loads"]
    else:
        raise ValueError(f"loads: {path.name!r}: use .npy, .json or .safetensors")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (2, 3):
        raise ValueError(f"{path}: loads must be [layers, experts] or [ranks, layers, experts], got shape {x.shape}")
    return x


def write_loads(path: str | Path, loads: np.ndarray) -> None:
    """Write a load file; the format follows the suffix."""
    path = Path(path)
    x = np.asarray(loads, dtype=np.float64)
    if path.suffix == ".npy":
        np.save(path, x)
    elif path.suffix == ".json":
        path.write_text(json.dumps({"loads": x.tolist()}))
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"loads": x.astype(np.float32)}, str(path))
    else:
        raise ValueError(f"loads: {path.name!r}: use .npy, .json or .safetensors")


def scale_loads(loads: np.ndarray, per_layer_total: float) -> np.ndarray:
    """Rescale so that every layer sums to `per_layer_total` (over ranks too for [R, L, E])."""
    x = np.asarray(loads, dtype=np.float64)
    sums = x.sum(axis=(0, 2) if x.ndim == 3 else 1)
    if (sums <= 0).any():
        raise ValueError(f"loads: layer(s) {np.flatnonzero(sums <= 0).tolist()} have no load")
    scale = per_layer_total / sums
    return x * (scale[None, :, None] if x.ndim == 3 else scale[:, None])
