"""Expert-load files and synthetic skewed loads for the planner.

A load file holds tokens per expert: shape [layers, experts], or [ranks, layers, experts] when it says which
attention rank sent them. Only proportions matter to `moemesh plan`: it rescales each layer to the decode batch
(`--tokens-per-rank` tokens per rank, top-k experts each). Formats:
- `.npy`: the array itself (any float or int dtype);
- `.json`: `{"loads": [[...], ...]}` (or the bare nested list);
- `.safetensors`: a tensor named `loads`.

Synthetic loads: `zipf_loads` (skewed popularity, no structure) and `clustered_loads` (co-activated expert clusters,
each attention rank leaning towards some clusters: returns [ranks, layers, experts] and the cluster of every expert).
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


def clustered_loads(ranks: int, layers: int, experts: int, clusters: int, total: float, *, exponent: float = 0.6,
                    affinity: float = 4.0, background: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Co-activated expert clusters: (loads [ranks, layers, experts], cluster [layers, experts]).

    Per layer the experts are dealt at random into `clusters` groups of near-equal size (cluster[l, e] = its group);
    experts of a group fire together, so a group's experts share its load evenly. Group popularity follows Zipf with
    `exponent` over a random order of groups. Each attention rank r leans towards group (r + l) mod clusters of
    layer l, whose weight it multiplies by 1 + `affinity` (the per-source skew: ranks 'own' different groups).
    A `background` share of every rank's tokens is spread evenly over all experts. Every layer sums to `total` over
    ranks and experts (each rank sends total / ranks)."""
    if not 0 < clusters <= experts:
        raise ValueError(f"clusters: must be in 1..{experts} (experts), got {clusters}")
    if exponent < 0 or affinity < 0 or not 0 <= background <= 1:
        raise ValueError(f"exponent, affinity >= 0 and 0 <= background <= 1, got {exponent}, {affinity}, "
                         f"{background}")
    rng = np.random.default_rng(seed)
    R, L, E, C = ranks, layers, experts, clusters
    cluster = np.stack([rng.permutation(np.arange(E) % C) for _ in range(L)])                  # [L, E]
    size = np.stack([np.bincount(c, minlength=C) for c in cluster])                            # [L, C]
    popularity = np.stack([rng.permutation(np.arange(1, C + 1, dtype=np.float64) ** -exponent)
                           for _ in range(L)])                                                 # [L, C]
    own = (np.arange(R)[:, None] + np.arange(L)[None, :]) % C                                   # [R, L]
    weight = popularity[None] * (1 + affinity * (np.arange(C)[None, None] == own[..., None]))   # [R, L, C]
    weight /= weight.sum(-1, keepdims=True)
    per_expert = np.take_along_axis(weight / size[None], np.broadcast_to(cluster[None], (R, L, E)), 2)  # [R, L, E]
    loads = (1 - background) * per_expert + background / E
    return loads * (total / R), cluster


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
