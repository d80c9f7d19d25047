"""HF-format DeepSeek-V4 checkpoints: `config.json` + safetensors shards (+ `model.safetensors.index.json`).

`Checkpoint` reads lazily and selectively: it maps canonical tensor names to (file, stored name) from the index json
(touching no shard) or, without one, from the shards' headers; `read(names)` opens only the shards that hold those
tensors and reads only those tensors, dequantizing FP8/FP4 weights with their companion scales (see quant.py).
Every error is a `CheckpointError` naming the file and the tensor or field. `save_checkpoint` writes the same format.
See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from moemesh.kernels import quant
from moemesh.kernels.config import ConfigError, ModelConfig
from moemesh.kernels.weights import canonical_name, expert_of, expert_tensor_names, scale_names, tensor_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# bits per element of every safetensors dtype we accept
_DTYPE_BITS = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4,
               "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8}
_FP4_STORAGE = ("I8", "U8", "F4")
_PROGRESS_MIN = 64  # auto progress bar from this many tensors on
_TMP_SHARD = ".shard-being-written-"  # save_checkpoint: shards until their final names are known


class CheckpointError(ValueError):
    """A checkpoint we cannot read; the message names the file and the tensor or field."""


def read_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header ourselves (before safetensors sees the file): {name: {dtype, shape,
    data_offsets}}, without `__metadata__`. Raises CheckpointError on a truncated file or a corrupt header."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header: header length {n} does not fit the file "
                                  f"size {size} (truncated or not a safetensors file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_len)
    return header


def _check_entry(path: Path, name: str, entry, data_len: int) -> None:
    try:
        dtype, shape, (start, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header: entry for tensor {name!r} is malformed") from None
    if dtype not in _DTYPE_BITS:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    nbytes = math.ceil(math.prod(shape) * _DTYPE_BITS[dtype] / 8)
    if end - start != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {[start, end]} hold {end - start} bytes, "
                              f"its shape {shape} and dtype {dtype} need {nbytes}")
    if end > data_len:
        raise CheckpointError(f"{path}: tensor {name!r}: data ends at byte {end} but the file holds {data_len} "
                              f"bytes of data (file truncated?)")


class Checkpoint:
    """A DeepSeek-V4 checkpoint directory, opened lazily.

    `on_read(file, stored_name)` is called for every tensor read from disk (weights and scales), and `files_opened`
    records every shard whose header or data was touched, so tests can prove what a selective load read.
    """

    def __init__(self, path: str | Path, *, on_read: Callable[[Path, str], None] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        try:
            self.config = ModelConfig.from_file(self.path / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        self.on_read = on_read
        self.files_opened: set[Path] = set()
        self._headers: dict[Path, dict] = {}
        self._source = self.path / INDEX_FILE if (self.path / INDEX_FILE).exists() else self.path
        self._where = self._map_from_index() if self._source != self.path else self._map_from_headers()
        self._shapes = tensor_shapes(self.config)
        missing = [n for n in self._shapes if n not in self._where]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self._source}: tensor {missing[0]!r} is missing{more}")
        if self._source == self.path:  # headers are parsed already: check every shape now, at no extra I/O
            self.validate()

    # ---- the name -> (file, stored name) map ------------------------------------------------------------------
    def _map_from_index(self) -> dict[str, tuple[Path, str]]:
        try:
            weight_map = json.loads(self._source.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self._source}: not a valid index (needs a `weight_map` object): {e}") from None
        where: dict[str, tuple[Path, str]] = {}
        for raw, fname in weight_map.items():
            file = self.path / fname
            if not file.is_file():
                raise CheckpointError(f"{self._source}: tensor {raw!r} points to missing file {fname!r}")
            self._add(where, raw, file)
        return where

    def _map_from_headers(self) -> dict[str, tuple[Path, str]]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
        where: dict[str, tuple[Path, str]] = {}
        for file in files:
            for raw in self._header(file):
                self._add(where, raw, file)
        return where

    @staticmethod
    def _add(where: dict, raw: str, file: Path) -> None:
        name = canonical_name(raw)
        if name in where:
            other_file, other = where[name]
            raise CheckpointError(f"{file}: tensor {raw!r} duplicates {other!r} in {other_file.name} "
                                  f"(both are {name!r})")
        where[name] = (file, raw)

    def _header(self, file: Path) -> dict:
        if file not in self._headers:
            self.files_opened.add(file)
            self._headers[file] = read_header(file)
        return self._headers[file]

    # ---- selectors -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor the config calls for (canonical names, dequantized view: scales are not listed)."""
        return list(self._shapes)

    def expert_names(self, layer: int, experts: Iterable[int]) -> list[str]:
        """w1/w2/w3 of the given routed experts of one layer."""
        cfg = self.config
        if not 0 <= layer < cfg.num_hidden_layers:
            raise CheckpointError(f"{self.path}: layer {layer} out of range 0..{cfg.num_hidden_layers - 1}")
        out = []
        for e in experts:
            if not 0 <= e < cfg.n_routed_experts:
                raise CheckpointError(f"{self.path}: expert {e} out of range 0..{cfg.n_routed_experts - 1}")
            out += expert_tensor_names(layer, e)
        return out

    def non_expert_names(self, engram_tables: bool = True) -> list[str]:
        """Everything but the routed experts (what an attention worker holds); optionally without Engram tables."""
        return list(tensor_shapes(self.config, routed_experts=False, engram_tables=engram_tables))

    def read_experts(self, layer: int, experts: Iterable[int], **kw) -> dict[str, Tensor]:
        return self.read(self.expert_names(layer, experts), **kw)

    def read_non_experts(self, engram_tables: bool = True, **kw) -> dict[str, Tensor]:
        return self.read(self.non_expert_names(engram_tables), **kw)

    def read_all(self, **kw) -> dict[str, Tensor]:
        return self.read(self.names(), **kw)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The checkpoint directory when it ships a tokenizer.json, else None."""
        return self.path if (self.path / "tokenizer.json").is_file() else None

    # ---- validation ------------------------------------------------------------------------------------------
    def validate(self, names: Iterable[str] | None = None) -> None:
        """Check stored dtypes and shapes (headers only, no tensor data) against the config; all names by default."""
        for name in self._shapes if names is None else names:
            self._parts(name)

    def _scale_of(self, name: str) -> str | None:
        return next((s for s in scale_names(name) if s in self._where), None)

    def _parts(self, name: str) -> tuple[str, str | None]:
        """(weight name, scale name or None), after checking both against the config's shape."""
        if name not in self._where:
            raise CheckpointError(f"{self._source}: tensor {name!r} is not in the checkpoint")
        file, raw = self._where[name]
        entry = self._header(file).get(raw)
        if entry is None:
            raise CheckpointError(f"{file}: tensor {raw!r} is listed in {INDEX_FILE} but not in the file")
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        want = self._shapes.get(name)
        scale = self._scale_of(name) if dtype in ("F8_E4M3", *_FP4_STORAGE) else None
        fp4 = scale is not None and dtype in _FP4_STORAGE
        if want is not None:
            stored_want = (want[0], want[1] // 2) if fp4 and dtype != "F4" else want
            if shape != stored_want:
                raise CheckpointError(f"{file}: tensor {raw!r} ({dtype}) has shape {list(shape)}, expected "
                                      f"{list(stored_want)} for {name!r}")
        if dtype == "F8_E4M3" and scale is None:
            raise CheckpointError(f"{file}: FP8 tensor {raw!r} has no scale tensor ({' or '.join(scale_names(raw))})")
        if scale is not None:
            self._check_scale(name, scale, want or shape, fp4)
        return name, scale

    def _check_scale(self, name: str, scale: str, shape: tuple, fp4: bool) -> None:
        file, raw = self._where[scale]
        entry = self._header(file).get(raw)
        if entry is None:
            raise CheckpointError(f"{file}: tensor {raw!r} is listed in {INDEX_FILE} but not in the file")
        rows, cols = shape
        want = (rows, math.ceil(cols / quant.FP4_GROUP)) if fp4 else \
            (math.ceil(rows / quant.FP8_BLOCK), math.ceil(cols / quant.FP8_BLOCK))
        if tuple(entry["shape"]) != want:
            raise CheckpointError(f"{file}: scale tensor {raw!r} has shape {entry['shape']}, expected {list(want)} "
                                  f"for {'FP4' if fp4 else 'FP8'} weight {name!r}")

    # ---- reading ---------------------------------------------------------------------------------------------
    def read(self, names: Iterable[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             *, dequantize: bool = True, progress: bool | None = None) -> dict[str, Tensor]:
        """Read tensors by canonical name, on `device`. Floating tensors come back as `dtype`, FP8/FP4 weights
        dequantized; integer tensors (tid2eid) keep their dtype. `dequantize=False` returns every tensor as stored
        (`dtype` unused), quantized weights with their scales under the scales' canonical names (for kernels that
        consume FP8/FP4 directly). `progress=None` shows a tqdm bar on a terminal when reading many tensors."""
        parts = {name: self._parts(name) for name in dict.fromkeys(names)}
        users: dict[str, list[str]] = {}  # stored tensor -> requested names that need it
        for name, (weight, scale) in parts.items():
            for n in (weight, scale) if scale else (weight,):
                users.setdefault(n, []).append(name)
        by_file: dict[Path, list[str]] = {}
        for n in users:
            by_file.setdefault(self._where[n][0], []).append(n)
        show = sys.stderr.isatty() and len(parts) >= _PROGRESS_MIN if progress is None else progress
        loaded: dict[str, Tensor] = {}
        out: dict[str, Tensor] = {}
        with tqdm(total=len(parts), desc=f"reading {self.path.name}", unit="tensor", disable=not show) as bar:
            for file, wanted in by_file.items():
                self._load(file, wanted, loaded)
                for name in dict.fromkeys(u for n in wanted for u in users[n]):  # finish what is complete now
                    weight, scale = parts[name]
                    if name not in out and weight in loaded and (scale is None or scale in loaded):
                        out.update(self._finish(name, loaded[weight], scale and loaded[scale], dtype, device,
                                                dequantize, scale))
                        bar.update(1)
                for n in [n for n in loaded if all(u in out for u in users[n])]:  # free what nobody waits for
                    del loaded[n]
        return out

    def iter_rows(self, name: str, start: int, end: int, dtype: torch.dtype = torch.float32,
                  chunk_rows: int = 1 << 16) -> Iterator[Tensor]:
        """Rows [start, end) of a 2-D float or FP8 tensor, `chunk_rows` at a time, reading only those rows (an FP8
        tensor from the enclosing 128-row blocks, since one scale covers 128 rows). For tables too big to read whole
        (Engram). Each read is reported to `on_read`."""
        weight, scale = self._parts(name)
        block = quant.FP8_BLOCK if scale else 1
        first = start // block * block
        scales = None
        if scale:
            with self._open(scale) as f:
                scales = f.get_slice(self._where[scale][1])[first // block: math.ceil(end / block)]
        step = max(block, chunk_rows // block * block)
        with self._open(weight) as f:
            rows = f.get_slice(self._where[weight][1])
            for a in range(first, end, step):
                b = min(a + step, end)
                w = rows[a:b]
                if scales is not None:
                    w = quant.dequant_fp8(w, scales[(a - first) // block: math.ceil((b - first) / block)])
                elif not w.is_floating_point():
                    raise CheckpointError(f"{self._where[weight][0]}: {name!r} is stored as {w.dtype} without a "
                                          "scale; row reads need a float or FP8 tensor")
                yield w[max(start - a, 0):].to(dtype)

    def stored_files(self, name: str) -> list[Path]:
        """The files holding a tensor and its scale (to fingerprint a cache derived from them)."""
        weight, scale = self._parts(name)
        return [self._where[n][0] for n in (weight, scale) if n]

    def _open(self, name: str):
        file, raw = self._where[name]
        self.files_opened.add(file)
        if self.on_read is not None:
            self.on_read(file, raw)
        return safe_open(file, framework="pt", device="cpu")

    def _load(self, file: Path, wanted: list[str], loaded: dict[str, Tensor]) -> None:
        self.files_opened.add(file)
        with safe_open(file, framework="pt", device="cpu") as f:
            for n in wanted:
                raw = self._where[n][1]
                if self.on_read is not None:
                    self.on_read(file, raw)
                loaded[n] = f.get_tensor(raw)

    @staticmethod
    def _finish(name, weight, scale, dtype, device, dequantize, scale_name) -> dict[str, Tensor]:
        weight = weight.to(device)
        if not dequantize:
            return {name: weight} if scale is None else {name: weight, scale_name: scale.to(device)}
        if scale is not None:
            return {name: quant.dequantize(weight, scale.to(device)).to(dtype)}
        return {name: weight.to(dtype) if weight.is_floating_point() else weight}


# ---- writing -------------------------------------------------------------------------------------------------------
_V4_FP8 = re.compile(r"^layers\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])"
                     r"\.weight$")


def v4_quant_format(name: str) -> str | None:
    """How DeepSeek-V4 releases store a tensor: "fp4" (routed experts), "fp8" (attention linears, shared experts)
    or None (kept in its float dtype)."""
    if expert_of(name) is not None and name.endswith(".weight"):
        return "fp4"
    return "fp8" if _V4_FP8.match(name) else None


def quantization_config(scale_fmt: str = "ue8m0") -> dict:
    """The `quantization_config` entry of config.json for checkpoints written with `quantize="v4"`."""
    return {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": scale_fmt, "activation_scheme": "dynamic",
            "weight_block_size": [quant.FP8_BLOCK, quant.FP8_BLOCK], "expert_dtype": "fp4"}


def _stored(name: str, t: Tensor, fmt_of: Callable[[str], str | None], scale_fmt) -> dict[str, Tensor]:
    """One tensor as the group of tensors that stores it: {name} or {name, name.scale}."""
    fmt = fmt_of(name)
    if fmt is None:
        return {name: t.contiguous()}
    q, s = (quant.quant_fp8 if fmt == "fp8" else quant.quant_fp4)(t, scale_fmt=scale_fmt)
    return {name: q, scale_names(name)[0]: s}


def _check_tensor(name: str, t: Tensor, shapes: dict[str, tuple], seen: set[str]) -> None:
    if name not in shapes or name in seen:
        raise CheckpointError(f"save_checkpoint: tensor {name!r} is " + ("repeated" if name in seen else
                                                                          "not part of the config's model"))
    if tuple(t.shape) != shapes[name]:
        raise CheckpointError(f"save_checkpoint: tensor {name!r} has shape {list(t.shape)}, "
                              f"expected {list(shapes[name])}")
    seen.add(name)


def _check_complete(shapes: dict[str, tuple], have) -> None:
    missing = [n for n in shapes if n not in have]
    if missing:
        raise CheckpointError(f"save_checkpoint: tensor {missing[0]!r} is missing")


class _ShardWriter:
    """Writes groups of tensors into shards of at most `max_bytes` as they come (temporary names, one shard in
    memory at a time); `finish` names them `model-i-of-N` + index, or `model.safetensors` when there is one."""

    def __init__(self, out: Path, max_bytes: int | None):
        self.out, self.max_bytes = out, max_bytes
        self.files: list[tuple[Path, list[str]]] = []
        self.pending: dict[str, Tensor] = {}
        self.size = self.total = 0

    def add(self, group: dict[str, Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if self.max_bytes is not None and self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        self.pending.update(group)
        self.size += nbytes

    def flush(self) -> None:
        path = self.out / f"{_TMP_SHARD}{len(self.files) + 1:05d}"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.total += self.size
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending or not self.files:
            self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / SINGLE_FILE)
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            fname = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.out / fname)
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], cfg: ModelConfig,
                    out_dir: str | Path, *, max_shard_bytes: int | None = None,
                    quantize: str | Callable[[str], str | None] = "none", scale_fmt: str = "ue8m0") -> Path:
    """Write `config.json` and the tensors (canonical names, float shapes as `tensor_shapes(cfg)`) as safetensors.

    `tensors`: a dict (checked whole before anything is written), or an iterable of (name, tensor) pairs consumed
    lazily, so a writer producing a large model tensor by tensor holds at most one shard in memory (checked as they
    come; a missing one is reported at the end). `quantize`: "none" (store as given), "v4" (FP8 attention linears and
    shared experts, FP4 routed experts, as the releases ship) or a function name -> "fp8" | "fp4" | None. Shards hold
    at most `max_shard_bytes` (a weight and its scale stay together; a bigger tensor gets a shard of its own); more
    than one shard adds `model.safetensors.index.json`. Safetensors files and an index already in `out_dir` are
    replaced. Returns `out_dir`."""
    shapes = tensor_shapes(cfg)
    if isinstance(tensors, Mapping):
        seen: set[str] = set()
        for name, t in tensors.items():
            _check_tensor(name, t, shapes, seen)
        _check_complete(shapes, tensors)
        tensors = tensors.items()
    fmt_of = {"none": lambda _: None, "v4": v4_quant_format}.get(quantize, quantize) if isinstance(quantize, str) \
        else quantize
    if not callable(fmt_of):
        raise CheckpointError(f"save_checkpoint: quantize must be 'none', 'v4' or a function, got {quantize!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob(_TMP_SHARD + "*"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    hf = cfg.to_hf_dict()
    if quantize != "none":
        hf["quantization_config"] = quantization_config(scale_fmt)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    writer, seen = _ShardWriter(out, max_shard_bytes), set()
    for name, t in tensors:
        _check_tensor(name, t, shapes, seen)
        writer.add(_stored(name, t, fmt_of, scale_fmt))
    _check_complete(shapes, seen)
    writer.finish()
    return out
