"""Codec: tensors survive the wire bit for bit in every wire dtype, and malformed tensors fail naming the field."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from moemesh.proto import codec, engram_pb2, tensor_pb2
from moemesh.proto.codec import EngramLookup, TokenBatch

# decoded tensors are read-only views of the message bytes on purpose (torch warns once per process)
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

SHAPES = [(3, 5), (0, 4), (4, 0), (), (2, 3, 4)]


def _sample(dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(dtype)


def _wire(msg):  # through real serialized bytes, as on a channel
    return type(msg).FromString(msg.SerializeToString())


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()), ids=str)
def test_round_trip_is_exact(dtype, shape):
    t = _sample(dtype, shape)
    msg = _wire(codec.encode_tensor(t))
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    assert _bits_equal(codec.decode_tensor(msg, "x"), t)


def test_bfloat16_bits_survive():
    # values that float32 round-tripping would not preserve bit-exactly as bf16: subnormals, -0, inf, nan
    t = torch.tensor([1e-40, -0.0, float("inf"), float("nan"), 3.140625], dtype=torch.bfloat16)
    assert _bits_equal(codec.decode_tensor(_wire(codec.encode_tensor(t)), "x"), t)


def test_non_contiguous_and_strided_tensors_encode_their_values():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for view in (t.T, t[:, ::2], t[1:]):
        assert torch.equal(codec.decode_tensor(_wire(codec.encode_tensor(view)), "x"), view)


@pytest.mark.parametrize("dtype", ["float64", "", "uint8", "bf16"])
def test_unknown_dtype_names_the_field(dtype):
    msg = tensor_pb2.Tensor(data=b"\0" * 8, dtype=dtype, shape=[1])
    with pytest.raises(ValueError, match=r"hidden\.dtype"):
        codec.decode_tensor(msg, "hidden")


def test_dtype_not_allowed_for_the_field():
    msg = codec.encode_tensor(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weights\.dtype: 'int32' not allowed"):
        codec.decode_tensor(msg, "weights", ("float32",))


@pytest.mark.parametrize("delta", [-1, -4, 1, 4])
def test_byte_length_must_match_shape(delta):
    msg = codec.encode_tensor(torch.ones(3, 4))
    data = msg.data[:delta] if delta < 0 else msg.data + b"\0" * delta
    bad = tensor_pb2.Tensor(data=data, dtype=msg.dtype, shape=msg.shape)
    with pytest.raises(ValueError, match=r"expert_ids\.data: \d+ bytes, but shape \[3, 4\] of float32 needs 48"):
        codec.decode_tensor(bad, "expert_ids")


def test_negative_shape_is_rejected():
    with pytest.raises(ValueError, match=r"x\.shape: negative"):
        codec.decode_tensor(tensor_pb2.Tensor(data=b"", dtype="float32", shape=[-1, 0]), "x")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.uint8, torch.complex64])
def test_encode_rejects_dtypes_that_cannot_travel(dtype):
    with pytest.raises(ValueError, match="hidden: dtype"):
        codec.encode_tensor(torch.zeros(2, dtype=dtype), "hidden")


def test_dispatch_request_and_reply_round_trip():
    batch = TokenBatch(layer=7, hidden=torch.randn(4, 16).to(torch.bfloat16),
                       expert_ids=torch.tensor([[1, 2], [3, -1], [0, 5], [7, 6]], dtype=torch.int32),
                       weights=torch.rand(4, 2), step_id=81, request_id="w1/s81", expert_map_version=3)
    got = codec.decode_dispatch(_wire(codec.encode_dispatch(batch)))
    assert (got.layer, got.step_id, got.request_id, got.expert_map_version) == (7, 81, "w1/s81", 3)
    for name in ("hidden", "expert_ids", "weights"):
        assert _bits_equal(getattr(got, name), getattr(batch, name)), name
    out = torch.randn(4, 16)
    reply = _wire(codec.encode_dispatch_reply(out, "w1/s81", 3))
    assert reply.request_id == "w1/s81" and reply.expert_map_version == 3
    assert torch.equal(codec.decode_dispatch_reply(reply), out)


@pytest.mark.parametrize("missing", ["hidden", "expert_ids", "weights"])
def test_dispatch_missing_tensor_names_the_field(missing):
    msg = codec.encode_dispatch(TokenBatch(0, torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long),
                                           torch.zeros(1, 2)))
    msg.ClearField(missing)
    with pytest.raises(ValueError, match=f"^{missing}: missing"):
        codec.decode_dispatch(_wire(msg))


def test_dispatch_field_dtypes_are_enforced():
    msg = codec.encode_dispatch(TokenBatch(0, torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long),
                                           torch.zeros(1, 2)))
    msg.weights.CopyFrom(codec.encode_tensor(torch.zeros(1, 2, dtype=torch.float16)))
    with pytest.raises(ValueError, match=r"weights\.dtype"):
        codec.decode_dispatch(msg)
    msg = codec.encode_dispatch(TokenBatch(0, torch.zeros(1, 4, dtype=torch.int32),
                                           torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2)))
    with pytest.raises(ValueError, match=r"hidden\.dtype"):
        codec.decode_dispatch(msg)


def test_engram_lookup_round_trip():
    ids = {1: torch.randint(0, 2**40, (5,)), 14: torch.zeros(0, dtype=torch.long)}
    lookup = codec.decode_lookup(_wire(codec.encode_lookup(EngramLookup(ids, request_id="q"))))
    assert lookup.request_id == "q" and list(lookup.row_ids) == [1, 14]
    assert all(torch.equal(lookup.row_ids[l], ids[l]) for l in ids)
    rows = {14: torch.randn(5, 32).to(torch.float16), 1: torch.randn(0, 32)}
    back = codec.decode_lookup_reply(_wire(codec.encode_lookup_reply(rows)))
    assert list(back) == [14, 1] and all(_bits_equal(back[l], rows[l]) for l in rows)
    bad = engram_pb2.LookupRequest(layers=[engram_pb2.LayerRowIds(layer=1, row_ids=codec.encode_tensor(ids[1].int()))])
    with pytest.raises(ValueError, match=r"layers\[0\]\.row_ids\.dtype"):
        codec.decode_lookup(bad)
    twice = engram_pb2.LookupRequest(layers=[engram_pb2.LayerRowIds(layer=1, row_ids=codec.encode_tensor(ids[1]))] * 2)
    with pytest.raises(ValueError, match=r"layers\[1\]\.layer: layer 1 appears more than once"):
        codec.decode_lookup(twice)
    with pytest.raises(ValueError, match=r"layers\[0\]\.row_ids: missing"):
        codec.decode_lookup(engram_pb2.LookupRequest(layers=[engram_pb2.LayerRowIds(layer=1)]))


def test_decoding_does_not_copy():
    # the decoded tensor's memory is the field's bytes object itself (duck-typed message to hold on to that object)
    data = torch.arange(1024, dtype=torch.float32).numpy().tobytes()
    t = codec.decode_tensor(SimpleNamespace(data=data, dtype="float32", shape=[32, 32]), "x")
    assert t.data_ptr() == ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert torch.equal(t, torch.arange(1024, dtype=torch.float32).reshape(32, 32))
