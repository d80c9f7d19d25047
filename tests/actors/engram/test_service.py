"""Engram service: shards holding row ranges of the stacked tables (from a checkpoint, reading only their rows, in RAM
or memory-mapped), their gRPC server (malformed requests get INVALID_ARGUMENT / NOT_FOUND and it keeps serving), and
the attention worker's client (routing, de-duplication, LRU hot-row cache, replica failover): rows always equal the
single-process `EngramMemory.lookup`."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import moemesh
from moemesh.actors.engram import service as engram_service
from moemesh.actors.engram.client import (
    EngramClient,
    EngramClientConfig,
    EngramRoute,
    GrpcEngramTransport,
    InProcessEngramTransport,
    RowCache,
)
from moemesh.actors.engram.server import serve_engram_shard
from moemesh.actors.engram.service import EngramShard, engram_layout, shard_ranges, table_name
from moemesh.kernels import checkpoint as checkpoint_module
from moemesh.kernels.checkpoint import Checkpoint, save_checkpoint
from moemesh.proto import codec, engram_pb2, engram_pb2_grpc, errors, health_pb2, health_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


def _tables(model) -> dict[int, torch.Tensor]:
    return {l: model.layers[l].engram_memory.embed.weight.detach() for l in model.config.engram_layer_ids}


def _hash_ids(model, seed: int, n_seqs: int = 3, max_len: int = 40, vocab: int | None = None) -> dict:
    """Hash ids of a few random sequences (a step of fresh prompts)."""
    rng = random.Random(seed)
    vocab = vocab or model.config.vocab_size
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n_seqs)]
    return model.engram_hash_ids(seqs, [model.new_cache() for _ in seqs])


def _assert_exact(model, hash_ids: dict, rows: dict) -> None:
    want = model.lookup_engram(hash_ids)
    assert sorted(rows) == sorted(want)
    for l in want:
        assert rows[l].dtype == want[l].dtype and torch.equal(rows[l], want[l]), l


def _uneven_ranges(model) -> list[dict]:
    """3 shards of very different sizes, cutting through heads' tables."""
    out = [{}, {}, {}]
    for l, t in _tables(model).items():
        R = t.shape[0]
        for i, rng in enumerate([(0, 517), (517, R - 61), (R - 61, R)]):
            out[i][l] = rng
    return out


async def _serve(shards):
    servers = [await serve_engram_shard(s) for s in shards]
    return [server for server, _ in servers], [f"127.0.0.1:{port}" for _, port in servers]


# ---- ranges ----------------------------------------------------------------------------------------------------------
def test_shard_ranges_tile_the_table_evenly():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(5, 1) == [(0, 5)]
    for bad in ((3, 4), (3, 0)):
        with pytest.raises(ValueError, match="n_shards"):
            shard_ranges(*bad)


def test_layout_covers_every_engram_layer(model):
    layout = engram_layout(model.config, 3)
    for l, t in _tables(model).items():
        assert [s[l] for s in layout][0][0] == 0 and layout[-1][l][1] == t.shape[0]
        assert all(layout[i][l][1] == layout[i + 1][l][0] for i in range(2))


@pytest.mark.parametrize("ranges, match", [
    ({0: (0, 10)}, r"ranges: layer 0 is not an Engram layer"),
    ({1: (10, 10)}, r"ranges\[1\]: \[10, 10\)"),
    ({1: (0, 10**6)}, r"ranges\[1\]: \[0, 1000000\)"),
    ({}, r"ranges: a shard must hold"),
])
def test_bad_ranges_name_the_field(model, ranges, match):
    with pytest.raises(ValueError, match=match):
        EngramShard.from_tensors(model.config, ranges, _tables(model))


# ---- exact rows over gRPC and in process ----------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["even2", "uneven3"])
def test_grpc_shards_return_exactly_the_local_rows(model, tiny_model_dir, split):
    layout = engram_layout(model.config, 2) if split == "even2" else _uneven_ranges(model)
    shards = [EngramShard.from_checkpoint(tiny_model_dir, r) for r in layout]

    async def main():
        servers, addresses = await _serve(shards)
        client = EngramClient(model.config, [EngramRoute(r, [i]) for i, r in enumerate(layout)],
                              GrpcEngramTransport(dict(enumerate(addresses))), EngramClientConfig(cache_rows=0))
        try:
            return [(h, await client.lookup(h)) for h in (_hash_ids(model, seed) for seed in range(6))]
        finally:
            await client.close()
            for server in servers:
                await server.stop(None)

    for hash_ids, rows in asyncio.run(main()):
        _assert_exact(model, hash_ids, rows)
    assert all(s.counters.lookups >= 6 and s.counters.refused == 0 for s in shards)  # every shard took part


def test_in_process_transport_returns_exactly_the_local_rows(model):
    layout = _uneven_ranges(model)
    shards = {f"s{i}": EngramShard.from_tensors(model.config, r, _tables(model)) for i, r in enumerate(layout)}
    client = EngramClient(model.config, [EngramRoute(r, [f"s{i}"]) for i, r in enumerate(layout)],
                          InProcessEngramTransport(shards), EngramClientConfig(cache_rows=0))
    for seed in range(6):
        hash_ids = _hash_ids(model, seed)
        _assert_exact(model, hash_ids, asyncio.run(client.lookup(hash_ids)))
    empty = asyncio.run(client.lookup({1: torch.zeros(0, 4, dtype=torch.long)}))
    assert empty[1].shape == (0, model.config.engram_dim)


def test_bfloat16_shards_give_exact_float32_rows(model, tiny_model_dir):
    # the tiny checkpoint stores tables in bf16: a bf16 shard halves memory and wire bytes and loses nothing
    layout = engram_layout(model.config, 2)
    shards = {i: EngramShard.from_checkpoint(tiny_model_dir, r, dtype=torch.bfloat16) for i, r in enumerate(layout)}
    client = EngramClient(model.config, [EngramRoute(r, [i]) for i, r in enumerate(layout)],
                          InProcessEngramTransport(shards), EngramClientConfig(cache_rows=0))
    hash_ids = _hash_ids(model, 11)
    _assert_exact(model, hash_ids, asyncio.run(client.lookup(hash_ids)))
    assert shards[0].slices[1].rows.dtype == torch.bfloat16


# ---- the hot-row cache -----------------------------------------------------------------------------------------------
def test_row_cache_is_lru_and_bounded():
    cache = RowCache(3, 2, torch.float32)
    cache.put([1, 2, 3], torch.arange(6.0).view(3, 2))
    hit, rows = cache.get([2, 9, 1])
    assert hit.tolist() == [True, False, True] and rows.tolist() == [[2.0, 3.0], [0.0, 1.0]]
    cache.put([4], torch.full((1, 2), 7.0))  # 3 is least recently used now
    assert 3 not in cache and all(k in cache for k in (1, 2, 4)) and len(cache) == 3
    cache.put(list(range(10, 20)), torch.arange(20.0).view(10, 2))  # more than fit: the last 3 stay
    assert len(cache) == 3 and all(k in cache for k in (17, 18, 19))
    assert cache.get([19])[1].tolist() == [[18.0, 19.0]]


def test_cache_serves_repeated_ngrams_and_respects_its_capacity(model):
    layout = engram_layout(model.config, 2)
    shards = {i: EngramShard.from_tensors(model.config, r, _tables(model)) for i, r in enumerate(layout)}
    client = EngramClient(model.config, [EngramRoute(r, [i]) for i, r in enumerate(layout)],
                          InProcessEngramTransport(shards), EngramClientConfig(cache_rows=200))
    hash_ids = _hash_ids(model, 1, n_seqs=1, max_len=10)
    first = asyncio.run(client.lookup(hash_ids))
    c = client.counters
    misses, served = c.cache_misses, sum(s.counters.rows for s in shards.values())
    assert c.cache_hits == 0 and misses == c.rows_unique > 0
    second = asyncio.run(client.lookup(hash_ids))  # the same N-grams again: all from the cache, no shard call
    assert c.cache_hits == misses and c.cache_misses == misses and c.hit_rate == 0.5
    assert sum(s.counters.rows for s in shards.values()) == served
    _assert_exact(model, hash_ids, first)
    _assert_exact(model, hash_ids, second)
    for seed in range(2, 12):  # Zipf-like traffic over a small vocabulary: hits rise, capacity holds, rows exact
        h = _hash_ids(model, seed, vocab=12)
        _assert_exact(model, h, asyncio.run(client.lookup(h)))
        assert len(client.cache) <= 200
    assert len(client.cache) == 200 and c.cache_hits > 2 * misses


# ---- replicas and failover -------------------------------------------------------------------------------------------
def test_failover_to_another_replica_when_one_server_stops(model):
    layout = engram_layout(model.config, 2)
    shards = [EngramShard.from_tensors(model.config, layout[0], _tables(model)),  # range 0, replica a
              EngramShard.from_tensors(model.config, layout[0], _tables(model)),  # range 0, replica b
              EngramShard.from_tensors(model.config, layout[1], _tables(model))]

    async def main():
        servers, addresses = await _serve(shards)
        client = EngramClient(model.config, [EngramRoute(layout[0], ["a", "b"]), EngramRoute(layout[1], ["c"])],
                              GrpcEngramTransport(dict(zip("abc", addresses))),
                              EngramClientConfig(cache_rows=0, cooldown_s=60))
        try:
            results = [(h, await client.lookup(h)) for h in (_hash_ids(model, s) for s in range(4))]
            served_a = shards[0].counters.lookups
            assert served_a > 0 and shards[1].counters.lookups > 0  # replicas take turns
            await servers[0].stop(None)  # replica a goes away mid-test
            for seed in range(4, 10):
                h = _hash_ids(model, seed)
                results.append((h, await client.lookup(h)))
            failovers = client.counters.failovers
            await servers[1].stop(None)  # now range 0 has no replica left
            with pytest.raises(errors.Unavailable, match="no replica answered"):
                await client.lookup(_hash_ids(model, 99))
            return results, served_a, failovers
        finally:
            await client.close()
            for server in servers[2:]:
                await server.stop(None)

    results, served_a, failovers = asyncio.run(main())
    for hash_ids, rows in results:
        _assert_exact(model, hash_ids, rows)
    assert shards[0].counters.lookups == served_a  # nothing reached the stopped replica
    assert failovers == 1  # one failed call, then replica a sat out its cool-down


class _SlowShard(EngramShard):
    def lookup_many(self, row_ids):
        time.sleep(1.0)  # time under test: a replica slower than the client's attempt_timeout_s (0.2 s)
        return super().lookup_many(row_ids)


def test_a_replica_past_its_deadline_is_failed_over(model):
    layout = engram_layout(model.config, 1)[0]
    slow = _SlowShard.from_tensors(model.config, layout, _tables(model))
    fast = EngramShard.from_tensors(model.config, layout, _tables(model))

    async def main():
        servers, addresses = await _serve([slow, fast])
        client = EngramClient(model.config, [EngramRoute(layout, ["slow", "fast"])],
                              GrpcEngramTransport(dict(zip(["slow", "fast"], addresses))),
                              EngramClientConfig(cache_rows=0, attempt_timeout_s=0.2))
        try:
            h = _hash_ids(model, 5)
            return h, await client.lookup(h), client.counters.failovers
        finally:
            await client.close()
            for server in servers:
                await server.stop(None)

    hash_ids, rows, failovers = asyncio.run(main())
    _assert_exact(model, hash_ids, rows)
    assert failovers == 1


# ---- loading: only the shard's rows; memory-mapped tables -----------------------------------------------------------
class _SliceRecorder:
    """Stands in for safetensors' `safe_open` and records every row slice read (and every whole-tensor read)."""

    def __init__(self, real):
        self.real, self.slices, self.whole = real, [], []

    def __call__(self, file, **kw):
        recorder, handle = self, self.real(file, **kw)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                recorder.whole.append(name)
                return handle.get_tensor(name)

            def get_slice(self, name):
                rows = handle.get_slice(name)

                class Rows:
                    def __getitem__(self, key):
                        recorder.slices.append((name, key.start, key.stop))
                        return rows[key]

                return Rows()

        return Handle()


def test_a_shard_reads_only_its_own_rows(model, tiny_model_dir, monkeypatch):
    recorder = _SliceRecorder(checkpoint_module.safe_open)
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    monkeypatch.setattr(engram_service, "_CHUNK_ROWS", 300)  # several chunks per range
    read = []
    ckpt = Checkpoint(tiny_model_dir, on_read=lambda file, name: read.append(name))
    ranges = {1: (1000, 2500), 2: (7, 4000)}
    shard = EngramShard.from_checkpoint(ckpt, ranges)
    assert sorted(read) == [table_name(1), table_name(2)] and recorder.whole == []
    for l, (start, end) in ranges.items():
        spans = sorted((a, b) for name, a, b in recorder.slices if name == table_name(l))
        assert spans[0][0] == start and spans[-1][1] == end and len(spans) > 1
        assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))  # each row read once
        assert torch.equal(shard.slices[l].rows, _tables(model)[l][start:end])


def test_fp8_tables_are_read_by_blocks_and_dequantized_exactly(model, tiny_model_dir, tmp_path, monkeypatch):
    tensors = Checkpoint(tiny_model_dir).read_all()
    fp8_dir = save_checkpoint(tensors, model.config, tmp_path / "fp8",
                              quantize=lambda name: "fp8" if name.endswith(".engram.embed.weight") else None)
    recorder = _SliceRecorder(checkpoint_module.safe_open)
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    shard = EngramShard.from_checkpoint(fp8_dir, {2: (300, 1001)})
    want = Checkpoint(fp8_dir).read([table_name(2)])[table_name(2)]
    assert torch.equal(shard.slices[2].rows, want[300:1001]) and not torch.equal(want, tensors[table_name(2)])
    spans = [(a, b) for name, a, b in recorder.slices if name == table_name(2)]
    assert spans == [(256, 1001)]  # from the 128-row block holding row 300, nothing past the range


def _mapped_path(ptr: int) -> str:
    """The file backing address `ptr` in this process ('' for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 else ""
    raise AssertionError(f"address {ptr:#x} is not mapped")


def test_mmap_shard_is_file_backed_and_a_restart_remaps_without_reading(model, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    ranges = {1: (100, 3000), 2: (0, 2000)}
    in_ram = EngramShard.from_checkpoint(tiny_model_dir, ranges)
    mapped = EngramShard.from_checkpoint(tiny_model_dir, ranges, mmap_dir=tmp_path)
    ids = torch.tensor([100, 2999, 555, 555, 1234])
    assert torch.equal(mapped.lookup(1, ids), in_ram.lookup(1, ids))
    path = mapped.slices[1].path
    assert _mapped_path(mapped.slices[1].rows.data_ptr()) == str(path.resolve())
    assert _mapped_path(in_ram.slices[1].rows.data_ptr()) != str(path.resolve())
    assert "mmap" in mapped.health()
    stat = path.stat()

    recorder = _SliceRecorder(checkpoint_module.safe_open)
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    again = EngramShard.from_checkpoint(tiny_model_dir, ranges, mmap_dir=tmp_path)  # a restarted shard
    assert recorder.slices == [] and path.stat().st_ino == stat.st_ino  # re-mapped, checkpoint untouched
    assert torch.equal(again.slices[2].rows, in_ram.slices[2].rows)

    with open(path, "r+b") as fh:  # a damaged file (truncated) is rewritten from the checkpoint
        fh.truncate(stat.st_size - 64)
    fixed = EngramShard.from_checkpoint(tiny_model_dir, ranges, mmap_dir=tmp_path)
    assert recorder.slices and torch.equal(fixed.slices[1].rows, in_ram.slices[1].rows)
    other = EngramShard.from_tensors(model.config, ranges, {l: t * 2 for l, t in _tables(model).items()},
                                     mmap_dir=tmp_path)  # another source: its header differs, the file is replaced
    assert torch.equal(other.slices[1].rows, in_ram.slices[1].rows * 2)


# ---- validation and the gRPC server under bad input -----------------------------------------------------------------
def test_shard_validation_names_the_field(model):
    shard = EngramShard.from_tensors(model.config, {1: (0, 1000)}, _tables(model))
    cases = [
        ((0, torch.tensor([1])), ValueError, r"layer: 0 is not an Engram layer"),
        ((2, torch.tensor([1])), errors.NotHeld, r"layer: 2 is not held"),
        ((1, torch.tensor([1], dtype=torch.int32)), ValueError, r"row_ids\[1\]: expected an int64"),
        ((1, torch.tensor([[1]])), ValueError, r"row_ids\[1\]: expected an int64 tensor of shape \[m\]"),
        ((1, torch.tensor([-1])), ValueError, r"row_ids\[1\]: rows must lie in layer 1's table"),
        ((1, torch.tensor([5, 1000])), errors.NotHeld, r"rows 5..1000 are not all in this shard's range \[0, 1000\)"),
    ]
    for args, kind, match in cases:
        with pytest.raises(kind, match=match):
            shard.lookup(*args)
    assert shard.counters.refused == len(cases) and shard.counters.lookups == 0
    assert shard.lookup(1, torch.zeros(0, dtype=torch.long)).shape == (0, model.config.engram_head_dim)


def test_client_validation_names_the_field(model):
    layout = engram_layout(model.config, 2)
    shards = {i: EngramShard.from_tensors(model.config, r, _tables(model)) for i, r in enumerate(layout)}
    client = EngramClient(model.config, [EngramRoute(r, [i]) for i, r in enumerate(layout)],
                          InProcessEngramTransport(shards))
    for hash_ids, match in [({0: torch.zeros(1, 4, dtype=torch.long)}, r"layer 0 is not an Engram layer"),
                            ({1: torch.zeros(1, 3, dtype=torch.long)}, r"hash_ids\[1\]: expected integer ids"),
                            ({1: torch.zeros(1, 4)}, r"hash_ids\[1\]: expected integer ids"),
                            ({1: torch.full((1, 4), 10**6)}, r"hash_ids\[1\]: an index lies outside")]:
        with pytest.raises(ValueError, match=match):
            asyncio.run(client.lookup(hash_ids))
    with pytest.raises(ValueError, match=r"layer 1's ranges must tile"):
        EngramClient(model.config, [EngramRoute(layout[0], [0])], InProcessEngramTransport(shards))
    with pytest.raises(ValueError, match=r"routes\[1\]\.replicas"):
        EngramClient(model.config, [EngramRoute(layout[0], [0]), EngramRoute(layout[1], [])],
                     InProcessEngramTransport(shards))


def _request(layer: int, row_ids: tensor_pb2.Tensor) -> engram_pb2.LookupRequest:
    return engram_pb2.LookupRequest(layers=[engram_pb2.LayerRowIds(layer=layer, row_ids=row_ids)])


GOOD_IDS = torch.tensor([3, 70, 3, 999])
MALFORMED = {
    "wrong dtype": (_request(1, codec.encode_tensor(GOOD_IDS.int())), grpc.StatusCode.INVALID_ARGUMENT,
                    "layers[0].row_ids.dtype"),
    "truncated bytes": (_request(1, tensor_pb2.Tensor(data=codec.encode_tensor(GOOD_IDS).data[:-5], dtype="int64",
                                                      shape=[4])),
                        grpc.StatusCode.INVALID_ARGUMENT, "layers[0].row_ids.data"),
    "unknown layer": (_request(0, codec.encode_tensor(GOOD_IDS)), grpc.StatusCode.INVALID_ARGUMENT,
                      "layer: 0 is not an Engram layer"),
    "layer held elsewhere": (_request(2, codec.encode_tensor(GOOD_IDS)), grpc.StatusCode.NOT_FOUND,
                             "layer: 2 is not held"),
    "outside the table": (_request(1, codec.encode_tensor(torch.tensor([10**9]))), grpc.StatusCode.INVALID_ARGUMENT,
                          "rows must lie in layer 1's table"),
    "outside the shard's range": (_request(1, codec.encode_tensor(torch.tensor([1000]))), grpc.StatusCode.NOT_FOUND,
                                  "not all in this shard's range"),
    "missing tensor": (engram_pb2.LookupRequest(layers=[engram_pb2.LayerRowIds(layer=1)]),
                       grpc.StatusCode.INVALID_ARGUMENT, "layers[0].row_ids: missing"),
}


def test_malformed_requests_get_status_codes_and_the_server_keeps_serving(model):
    shard = EngramShard.from_tensors(model.config, {1: (0, 1000)}, _tables(model))

    async def main():
        (server,), (address,) = await _serve([shard])
        seen = {}
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = engram_pb2_grpc.EngramStub(channel)
                for name, (msg, _, _) in MALFORMED.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Lookup(msg, timeout=5)
                    seen[name] = info.value
                with pytest.raises(grpc.aio.AioRpcError) as info:  # random garbage on a raw channel call
                    await channel.unary_unary("/moemesh.Engram/Lookup")(
                        np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(), timeout=5)
                seen["garbage"] = info.value
                reply = await stub.Lookup(_request(1, codec.encode_tensor(GOOD_IDS)), timeout=5)
                health = health_pb2_grpc.HealthStub(channel)
                before = await health.Check(health_pb2.HealthCheckRequest(service="moemesh.Engram"), timeout=5)
                shard.close()
                after = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as closed:
                    await stub.Lookup(_request(1, codec.encode_tensor(GOOD_IDS)), timeout=5)
        finally:
            await server.stop(None)
        return seen, reply, before, after, closed.value

    seen, reply, before, after, closed = asyncio.run(main())
    for name, (_, code, text) in MALFORMED.items():
        assert seen[name].code() == code, (name, seen[name].code(), seen[name].details())
        assert text in seen[name].details(), (name, seen[name].details())
    assert seen["garbage"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert torch.equal(codec.decode_lookup_reply(reply)[1], _tables(model)[1][GOOD_IDS])
    assert before.status == health_pb2.HealthCheckResponse.SERVING and "[0, 1000)" in before.detail
    assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert closed.code() == grpc.StatusCode.UNAVAILABLE
