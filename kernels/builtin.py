"""The registry of built-in models: what `moemesh init-model NAME` writes and what `model: NAME` serves.

Each entry is a `synthetic.BuiltinModel` (config + shard size); one writer (`synthetic.write_model`) writes them all.
To add one, define its `BuiltinModel` beside the others and list it in `BUILTIN_MODELS`.
"""

from __future__ import annotations

from pathlib import Path

from moemesh.kernels.synthetic import BuiltinModel, write_model
from moemesh.kernels.tiny import TINY
from moemesh.kernels.v4_mini import V4_FLASH_MINI, V41_FLASH_MINI

BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in (TINY, V4_FLASH_MINI, V41_FLASH_MINI)}


def builtin_model(name: str) -> BuiltinModel:
    """The built-in model called `name`; ValueError naming the known ones otherwise."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"model: {name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)})")
    return BUILTIN_MODELS[name]


def write_builtin_model(name: str, out_dir: str | Path, dtype: str = "v4", *, force: bool = False,
                        max_shard_bytes: int | None = None) -> Path:
    """Write the built-in model `name` to `out_dir` (see `synthetic.write_model`)."""
    return write_model(builtin_model(name), out_dir, dtype, force=force, max_shard_bytes=max_shard_bytes)
