"""The one module converting wire messages to and from torch tensors and our request types.

A tensor travels as `moemesh.Tensor {bytes data; string dtype; repeated int64 shape}`: row-major, little-endian
(every host we run on), exactly prod(shape) * itemsize bytes. Decoding checks the dtype (known, and allowed for the
field), the shape (non-negative) and the byte length, and raises ValueError naming the field; it does not copy:
the tensor is a view over the message's bytes (`torch.frombuffer`), so treat decoded tensors as read-only.
Semantic checks (hidden size, layer held, ...) belong to the receiver, which runs them for every transport.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from moemesh.proto import engram_pb2, expert_pb2, tensor_pb2

# Decoded tensors share the immutable bytes of the message; torch warns about that once per process. We accept
# read-only views on purpose (see the module docstring), so silence exactly that warning.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INT_DTYPES = ("int64", "int32")
_NAMES = {dt: name for name, dt in DTYPES.items()}


def encode_tensor(t: torch.Tensor, field: str = "tensor") -> tensor_pb2.Tensor:
    """A tensor (any device, any layout) -> `moemesh.Tensor` (one copy into the message's bytes)."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"{field}: dtype {t.dtype} cannot travel; wire dtypes are {list(DTYPES)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return tensor_pb2.Tensor(data=flat.view(torch.uint8).numpy().tobytes(), dtype=name, shape=list(t.shape))


def decode_tensor(msg: tensor_pb2.Tensor, field: str, dtypes: tuple[str, ...] = tuple(DTYPES)) -> torch.Tensor:
    """`moemesh.Tensor` -> a read-only CPU tensor viewing the message bytes. `dtypes`: the ones this field allows."""
    if msg.dtype not in DTYPES:
        raise ValueError(f"{field}.dtype: unknown dtype {msg.dtype!r}; wire dtypes are {list(DTYPES)}")
    if msg.dtype not in dtypes:
        raise ValueError(f"{field}.dtype: {msg.dtype!r} not allowed here; expected one of {list(dtypes)}")
    shape = tuple(msg.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{field}.shape: negative size in {list(shape)}")
    dtype = DTYPES[msg.dtype]
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(msg.data) != expected:
        raise ValueError(f"{field}.data: {len(msg.data)} bytes, but shape {list(shape)} of {msg.dtype} needs "
                         f"{expected}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(msg.data, dtype=dtype).reshape(shape)


def _field(msg, name: str, dtypes: tuple[str, ...]) -> torch.Tensor:
    if not msg.HasField(name):
        raise ValueError(f"{name}: missing")
    return decode_tensor(getattr(msg, name), name, dtypes)


@dataclass
class TokenBatch:
    """One MoE layer's tokens bound for one expert shard.  n = tokens, k = expert slots per token, D = hidden.

    hidden [n, D] float; expert_ids [n, k] int64/int32 global ids, -1 = empty slot; weights [n, k] float32."""

    layer: int
    hidden: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    step_id: int = 0
    request_id: str = ""
    expert_map_version: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.expert_ids, self.weights))


def encode_dispatch(batch: TokenBatch) -> expert_pb2.DispatchRequest:
    return expert_pb2.DispatchRequest(
        request_id=batch.request_id, step_id=batch.step_id, layer=batch.layer,
        expert_map_version=batch.expert_map_version, hidden=encode_tensor(batch.hidden, "hidden"),
        expert_ids=encode_tensor(batch.expert_ids, "expert_ids"), weights=encode_tensor(batch.weights, "weights"))


def decode_dispatch(msg: expert_pb2.DispatchRequest) -> TokenBatch:
    return TokenBatch(
        layer=msg.layer, hidden=_field(msg, "hidden", FLOAT_DTYPES),
        expert_ids=_field(msg, "expert_ids", INT_DTYPES), weights=_field(msg, "weights", ("float32",)),
        step_id=msg.step_id, request_id=msg.request_id, expert_map_version=msg.expert_map_version)


def encode_dispatch_reply(output: torch.Tensor, request_id: str = "",
                          expert_map_version: int = 0) -> expert_pb2.DispatchReply:
    return expert_pb2.DispatchReply(request_id=request_id, output=encode_tensor(output, "output"),
                                    expert_map_version=expert_map_version)


def decode_dispatch_reply(msg: expert_pb2.DispatchReply) -> torch.Tensor:
    """-> output [n, D]."""
    return _field(msg, "output", FLOAT_DTYPES)


@dataclass
class EngramLookup:
    """Global rows wanted from one Engram shard, per Engram layer.  row_ids {layer: [m] int64}: rows of the layer's
    stacked table (`layers.{layer}.engram.embed.weight`), not per-head indices."""

    row_ids: dict[int, torch.Tensor]
    request_id: str = ""


def encode_lookup(lookup: EngramLookup) -> engram_pb2.LookupRequest:
    return engram_pb2.LookupRequest(request_id=lookup.request_id, layers=[
        engram_pb2.LayerRowIds(layer=layer, row_ids=encode_tensor(ids, f"row_ids[{layer}]"))
        for layer, ids in lookup.row_ids.items()])


def decode_lookup(msg: engram_pb2.LookupRequest) -> EngramLookup:
    """Raises ValueError naming the entry: a layer asked twice, a missing or non-int64 `row_ids`."""
    row_ids: dict[int, torch.Tensor] = {}
    for i, entry in enumerate(msg.layers):
        if entry.layer in row_ids:
            raise ValueError(f"layers[{i}].layer: layer {entry.layer} appears more than once")
        if not entry.HasField("row_ids"):
            raise ValueError(f"layers[{i}].row_ids: missing")
        row_ids[entry.layer] = decode_tensor(entry.row_ids, f"layers[{i}].row_ids", ("int64",))
    return EngramLookup(row_ids, msg.request_id)


def encode_lookup_reply(rows: dict[int, torch.Tensor], request_id: str = "") -> engram_pb2.LookupReply:
    """{layer: rows [m, W]} -> LookupReply, entries in the dict's order."""
    return engram_pb2.LookupReply(request_id=request_id, layers=[
        engram_pb2.LayerRows(layer=layer, rows=encode_tensor(r, f"rows[{layer}]")) for layer, r in rows.items()])


def decode_lookup_reply(msg: engram_pb2.LookupReply) -> dict[int, torch.Tensor]:
    """-> {layer: rows [m, W]} (float dtypes), in the reply's order."""
    out: dict[int, torch.Tensor] = {}
    for i, entry in enumerate(msg.layers):
        if entry.layer in out or not entry.HasField("rows"):
            raise ValueError(f"layers[{i}]: layer {entry.layer} repeated or its rows missing")
        out[entry.layer] = decode_tensor(entry.rows, f"layers[{i}].rows", FLOAT_DTYPES)
    return out
