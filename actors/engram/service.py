"""Engram shard: contiguous row ranges of the Engram tables, held in host memory and served by global row id.

Every Engram layer's (order, head) tables are stacked into one table `layers.{l}.engram.embed.weight` [R_l, W]
(kernels/engram.py). The service splits each stacked table into contiguous row ranges [start, end) over >= 2 shards
(`shard_ranges`, `engram_layout`); several replicas may serve the same ranges. `EngramShard` is a plain class (no Ray,
no gRPC): built from a checkpoint it reads only its own rows (safetensors `get_slice`, FP8 tables dequantized from
the enclosing 128-row blocks), and with `mmap_dir` it writes its rows once to a file there and serves them from a
read-only memory map, so the table lives in the page cache, not the Python heap, and a restarted shard re-maps the
file (after checking its header) without touching the checkpoint. `server.serve_engram_shard` puts it behind `grpc.aio`.

Shapes: R = rows of a layer's stacked table, W = head_dim (row width), m = rows asked.
See docs/engram_service.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.engram import engram_table_sizes
from moemesh.proto import errors

RowRange = tuple[int, int]  # [start, end) rows of one layer's stacked table

_CHUNK_ROWS = 1 << 16  # rows read (and cast) at a time while loading
_FILE_HEADER = 4096  # bytes before the rows in a table file; keeps the rows page-aligned
_FILE_MAGIC = b"moemesh-engram-rows v1\n"


def table_name(layer: int) -> str:
    """Checkpoint name of a layer's stacked table."""
    return f"layers.{layer}.engram.embed.weight"


def shard_ranges(total_rows: int, n_shards: int) -> list[RowRange]:
    """Split rows [0, total_rows) into `n_shards` contiguous ranges whose sizes differ by at most one row (the first
    `total_rows % n_shards` ranges get the extra row)."""
    if n_shards < 1 or total_rows < n_shards:
        raise ValueError(f"n_shards: need 1 <= n_shards <= total_rows ({total_rows}), got {n_shards}")
    base, extra = divmod(total_rows, n_shards)
    bounds = [0]
    for i in range(n_shards):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def engram_layout(cfg: ModelConfig, n_shards: int) -> list[dict[int, RowRange]]:
    """Per shard, {Engram layer: its row range}: shard i holds range i of every layer's stacked table."""
    per_layer = {layer: shard_ranges(sum(engram_table_sizes(cfg, layer)), n_shards) for layer in cfg.engram_layer_ids}
    return [{layer: ranges[i] for layer, ranges in per_layer.items()} for i in range(n_shards)]


def check_ranges(cfg: ModelConfig, ranges: Mapping[int, RowRange]) -> dict[int, RowRange]:
    """Validate {layer: (start, end)}: Engram layers only, 0 <= start < end <= R. Returns it as plain ints."""
    if not ranges:
        raise ValueError("ranges: a shard must hold at least one layer's rows")
    out = {}
    for layer, rng in ranges.items():
        if layer not in cfg.engram_layer_ids:
            raise ValueError(f"ranges: layer {layer} is not an Engram layer ({cfg.engram_layer_ids})")
        total = sum(engram_table_sizes(cfg, layer))
        start, end = (int(x) for x in rng)
        if not 0 <= start < end <= total:
            raise ValueError(f"ranges[{layer}]: [{start}, {end}) is not a non-empty range inside [0, {total})")
        out[int(layer)] = (start, end)
    return out


# ---- row sources ----------------------------------------------------------------------------------------------------
class _TensorRows:
    """Rows of a full stacked table given as a tensor."""

    def __init__(self, table: torch.Tensor):
        self.table = table.detach().to("cpu")

    def fingerprint(self, start: int, end: int) -> str:
        data = self.table[start:end].contiguous().reshape(-1).view(torch.uint8).numpy()
        return f"tensor:{self.table.dtype}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"

    def chunks(self, start: int, end: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        for a in range(start, end, _CHUNK_ROWS):
            yield self.table[a:min(a + _CHUNK_ROWS, end)].to(dtype)


class _CheckpointRows:
    """Rows of a stacked table in a checkpoint (`Checkpoint.iter_rows`: only the rows asked are read)."""

    def __init__(self, ckpt: Checkpoint, layer: int):
        self.ckpt, self.name = ckpt, table_name(layer)
        self.files = ckpt.stored_files(self.name)

    def fingerprint(self, start: int, end: int) -> str:
        parts = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}:{self.name}" for f in self.files]
        return "checkpoint:" + hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def chunks(self, start: int, end: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        return self.ckpt.iter_rows(self.name, start, end, dtype, chunk_rows=_CHUNK_ROWS)


# ---- table files ----------------------------------------------------------------------------------------------------
def _file_header(meta: dict) -> bytes:
    text = _FILE_MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n"
    if len(text) > _FILE_HEADER:
        raise ValueError(f"table file header: {len(text)} bytes exceed {_FILE_HEADER}")
    return text.ljust(_FILE_HEADER, b"\0")


def _file_matches(path: Path, header: bytes, nbytes: int) -> bool:
    """The file exists, has the size the rows need and the same header (layer, range, dtype, source fingerprint)."""
    if not path.is_file() or path.stat().st_size != _FILE_HEADER + nbytes:
        return False
    with open(path, "rb") as fh:
        return fh.read(_FILE_HEADER) == header


def _write_file(path: Path, header: bytes, chunks: Iterable[torch.Tensor], nbytes: int) -> None:
    """Write header + rows to a temporary file, fsync, then rename over `path` (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            for chunk in chunks:
                written += fh.write(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())
            fh.flush()
            os.fsync(fh.fileno())
        if written != nbytes:
            raise ValueError(f"{path}: wrote {written} bytes of rows, expected {nbytes}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename; a failed write leaves nothing behind


def _map_file(path: Path, meta: dict, shape: tuple[int, int], dtype: torch.dtype,
              chunks: Callable[[], Iterable[torch.Tensor]]) -> tuple[torch.Tensor, mmap.mmap]:
    """Rows [m, W] memory-mapped read-only from `path`, written first (from `chunks()`) unless the file there already
    matches. An exclusive lock on `<path>.lock` lets replicas on one host share one file (and its page cache)."""
    header, nbytes = _file_header(meta), math.prod(shape) * dtype.itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _file_matches(path, header, nbytes):
            _write_file(path, header, chunks(), nbytes)
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    rows = torch.frombuffer(mapped, dtype=dtype, count=math.prod(shape), offset=_FILE_HEADER).view(shape)
    return rows, mapped


# ---- the shard ------------------------------------------------------------------------------------------------------
@dataclass
class RowSlice:
    """Rows [start, end) of one layer's stacked table: rows [end - start, W]; `path`: the file they are mapped from
    (None: in RAM)."""

    start: int
    end: int
    rows: torch.Tensor
    path: Path | None = None
    mapping: mmap.mmap | None = None  # keeps the memory map alive


def _load_slice(cfg: ModelConfig, layer: int, rng: RowRange, src, dtype: torch.dtype,
                mmap_dir: str | Path | None) -> "RowSlice":
    """One layer's rows [start, end) from `src`: copied chunk by chunk into RAM, or mapped from a table file."""
    start, end = rng
    shape = (end - start, cfg.engram_head_dim)
    if mmap_dir is None:
        rows, pos = torch.empty(shape, dtype=dtype), 0
        for chunk in src.chunks(start, end, dtype):
            rows[pos:pos + chunk.shape[0]] = chunk
            pos += chunk.shape[0]
        return RowSlice(start, end, rows)
    path = Path(mmap_dir) / f"engram-layer{layer}-rows{start}-{end}.bin"
    meta = {"layer": layer, "start": start, "end": end, "head_dim": shape[1], "dtype": str(dtype),
            "source": src.fingerprint(start, end)}
    rows, mapping = _map_file(path, meta, shape, dtype, lambda: src.chunks(start, end, dtype))
    return RowSlice(start, end, rows, path, mapping)


def _total_rows(cfg: ModelConfig, layer: int) -> int:
    return sum(engram_table_sizes(cfg, layer))


@dataclass
class EngramShardCounters:
    """Plain counters for metrics."""

    lookups: int = 0  # accepted lookup calls (one per request, however many layers)
    rows: int = 0  # rows served
    bytes_out: int = 0  # row payload bytes served
    refused: int = 0  # calls refused by validation (ValueError / NotHeld)


class EngramShard:
    """Row ranges of the Engram tables (one range per layer held), served by global row id. Thread-safe reads.

    `lookup` / `lookup_many` are the API; `counters`, `serving` and `health` are for metrics and health checks."""

    def __init__(self, cfg: ModelConfig, slices: Mapping[int, RowSlice]):
        self.cfg = cfg
        self.slices = dict(slices)
        self.totals = {layer: _total_rows(cfg, layer) for layer in self.slices}
        self.counters = EngramShardCounters()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, ranges: Mapping[int, RowRange], tables: Mapping[int, torch.Tensor], *,
                     dtype: torch.dtype | None = None, mmap_dir: str | Path | None = None) -> "EngramShard":
        """Take the rows `ranges` ({layer: (start, end)}) from full stacked tables `{layer: [R, W]}`; `dtype` None
        keeps the tables' dtype."""
        ranges = check_ranges(cfg, ranges)
        for layer in ranges:
            want = (_total_rows(cfg, layer), cfg.engram_head_dim)
            if layer not in tables:
                raise ValueError(f"tables: no table for layer {layer}")
            if tuple(tables[layer].shape) != want or not tables[layer].is_floating_point():
                raise ValueError(f"tables[{layer}]: {tables[layer].dtype} {list(tables[layer].shape)}, expected a "
                                 f"float table of shape {list(want)}")
        sources = {layer: _TensorRows(tables[layer]) for layer in ranges}
        dtypes = {layer: dtype or tables[layer].dtype for layer in ranges}
        return cls(cfg, {layer: _load_slice(cfg, layer, rng, sources[layer], dtypes[layer], mmap_dir)
                         for layer, rng in ranges.items()})

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | Checkpoint, ranges: Mapping[int, RowRange], *,
                        dtype: torch.dtype = torch.float32, mmap_dir: str | Path | None = None) -> "EngramShard":
        """Read only the rows `ranges` ({layer: (start, end)}) of the checkpoint's stacked tables, as `dtype` (FP8
        tables dequantized). With `mmap_dir`, a matching table file already there is mapped without reading."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        ranges = check_ranges(ckpt.config, ranges)
        return cls(ckpt.config, {layer: _load_slice(ckpt.config, layer, rng, _CheckpointRows(ckpt, layer), dtype,
                                                    mmap_dir) for layer, rng in ranges.items()})

    @property
    def ranges(self) -> dict[int, RowRange]:
        """{layer: (start, end)} held."""
        return {layer: (s.start, s.end) for layer, s in self.slices.items()}

    @property
    def serving(self) -> bool:
        return not self._closed

    def lookup(self, layer: int, row_ids: torch.Tensor) -> torch.Tensor:
        """Global rows of `layer`'s stacked table, int64 [m] -> rows [m, W] in the shard's dtype (a new tensor)."""
        return self.lookup_many({layer: row_ids})[layer]

    def lookup_many(self, row_ids: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: int64 [m] global rows} -> {layer: rows [m, W]}. Every entry is checked before any is served.

        Raises ValueError naming the field (not an Engram layer, wrong dtype/shape, rows outside the layer's table),
        NotHeld (a ValueError: the layer or some rows are held by another shard), Unavailable (closed)."""
        if self._closed:
            raise errors.Unavailable("Engram shard is closed")
        try:
            for layer, ids in row_ids.items():
                self._validate(layer, ids)
        except ValueError:
            with self._lock:
                self.counters.refused += 1
            raise
        out = {layer: self.slices[layer].rows.index_select(0, ids - self.slices[layer].start)
               for layer, ids in row_ids.items()}
        with self._lock:
            self.counters.lookups += 1
            self.counters.rows += sum(r.shape[0] for r in out.values())
            self.counters.bytes_out += sum(r.numel() * r.element_size() for r in out.values())
        return out

    def _validate(self, layer: int, ids) -> None:
        field = f"row_ids[{layer}]"
        if layer not in self.cfg.engram_layer_ids:
            raise ValueError(f"layer: {layer} is not an Engram layer ({self.cfg.engram_layer_ids})")
        if layer not in self.slices:
            raise errors.NotHeld(f"layer: {layer} is not held by this shard (holds {sorted(self.slices)})")
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            what = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{field}: expected an int64 tensor of shape [m], got {what}")
        if not ids.numel():
            return
        lo, hi = int(ids.min()), int(ids.max())
        s, total = self.slices[layer], self.totals[layer]
        if lo < 0 or hi >= total:
            raise ValueError(f"{field}: rows must lie in layer {layer}'s table [0, {total}), got {lo}..{hi}")
        if lo < s.start or hi >= s.end:
            raise errors.NotHeld(f"{field}: rows {lo}..{hi} are not all in this shard's range [{s.start}, {s.end}) "
                                 f"of layer {layer}")

    def health(self) -> str:
        """One line for health checks and logs."""
        held = {layer: f"[{s.start}, {s.end}) of {self.totals[layer]}" for layer, s in sorted(self.slices.items())}
        where = "mmap" if any(s.path for s in self.slices.values()) else "ram"
        return f"{'serving' if self.serving else 'closed'}; rows {held}; {where}; {self.counters.lookups} lookups"

    def close(self) -> None:
        """Stop serving: later lookups get Unavailable (the client fails over to another replica)."""
        self._closed = True
