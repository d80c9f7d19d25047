"""Collective expert transport over real gloo point-to-point on loopback: four processes (expert shards a, b, c on
ranks 0-2 and one attention worker on rank 3) in one process group. This file, run as a script, imports torch once
and forks the four (a cold `import torch` takes 10-50 s on a loaded 2-core machine; four in parallel, longer).

The worker's replies equal the in-process ExpertShard's bit for bit, errors come back as the gRPC path's exceptions
and the server keeps serving, a HybridTransport (one shard collective, one gRPC) adds up to exactly what two gRPC
shards give, the Dispatcher over it gives what it gives in process, also when shard c crashes (its tokens go to
replicas), a shard that stops and a closed transport raise Unavailable, and every process ends cleanly. Plus the
pure parts: framing, error mapping, links_from_groups, HybridTransport's checks, backend checks."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moemesh.actors.attention.token_dispatch import Dispatcher, ExpertMap
from moemesh.actors.experts.shard import BatchingConfig, ExpertShard
from moemesh.actors.experts.server import serve_expert_shard
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.weights import expert_tensor_names
from moemesh.proto import collective_link, errors
from moemesh.proto.codec import TokenBatch
from moemesh.proto.collective import CollectiveShardServer, CollectiveTransport
from moemesh.proto.collective_link import init_group
from moemesh.proto.hybrid import HybridTransport, links_from_groups
from moemesh.proto.transport import GrpcTransport, InProcessTransport

E, K, D, I = 8, 3, 16, 8  # experts, top-k, hidden, expert width
CFG = ModelConfig(vocab_size=50, hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                  num_hidden_layers=3, layer_types=["sliding_attention"] * 3, head_dim=16, num_attention_heads=2,
                  o_groups=1, swiglu_limit=3.0)
ASSIGN = {0: {1: [0, 1, 2, 3, 4], 2: [0, 5]}, 1: {1: [3, 4, 5, 6, 7], 2: [1, 2, 3, 4, 6, 7]},  # rank -> held
          2: {1: [3, 4]}}  # c: replicas of experts a and b hold too
SHARDS = {"a": 0, "b": 1, "c": 2}  # shard name -> rank
WORKER, WORLD = 3, 4
ROLES = [("shard", r) for r in SHARDS.values()] + [("worker", WORKER)]
# Every request is computed alone (no cross-request batching), so the expected values below are exact.
ALONE = BatchingConfig(max_wait_s=0.0, max_tokens=1)
LIMIT_S = 120  # a guard against hangs; a run takes ~10 s


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g, out = torch.Generator().manual_seed(seed), {}
    for layer in range(CFG.num_hidden_layers):
        for e in range(E):
            w1, w2, w3 = expert_tensor_names(layer, e)
            out[w1], out[w2], out[w3] = (torch.randn(I, D, generator=g) / 2, torch.randn(D, I, generator=g) / 2,
                                         torch.randn(I, D, generator=g) / 2)
    return out


TENSORS = _tensors()


def _batch(n: int, layer: int = 1, seed: int = 1, dtype=torch.float32, ids_dtype=torch.int64) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]) if n else torch.zeros(0, K).long()
    return TokenBatch(layer, torch.randn(n, D, generator=g).to(dtype), ids.to(ids_dtype), torch.rand(n, K, generator=g))


def _jobs() -> list[tuple[str, TokenBatch]]:
    """Sent all at once by the worker: several per shard, both layers, a bf16 hidden, int32 ids, an empty batch."""
    return [("a", _batch(7, 1, 1)), ("b", _batch(7, 1, 1)), ("a", _batch(3, 2, 2)), ("b", _batch(12, 2, 3)),
            ("a", _batch(5, 1, 4, torch.bfloat16)), ("b", _batch(9, 1, 5, ids_dtype=torch.int32)),
            ("a", _batch(0, 2, 6)), ("b", _batch(1, 1, 7)), ("a", _batch(33, 1, 8))]


def _malformed() -> list[tuple[str, TokenBatch]]:
    good = _batch(4, 1, 9)
    out_of_range = good.expert_ids.clone()
    out_of_range[2, 1] = E
    return [("a", TokenBatch(1, torch.randn(4, D + 1), good.expert_ids, good.weights)),  # hidden size
            ("b", TokenBatch(1, good.hidden, out_of_range, good.weights)),  # expert id out of range
            ("a", TokenBatch(0, good.hidden, good.expert_ids, good.weights)),  # layer not held
            ("b", TokenBatch(1, good.hidden, good.expert_ids, good.weights, expert_map_version=-1)),  # stale map
            ("a", TokenBatch(1, good.hidden, good.expert_ids, good.weights.half())),  # weights dtype (shard-side)
            ("b", TokenBatch(1, good.hidden, good.expert_ids, good.weights.double()))]  # cannot travel (client)


def _hybrid_batch() -> TokenBatch:
    return _batch(21, 2, 10)


def _expert_map() -> ExpertMap:
    return ExpertMap.from_assignment([ASSIGN[r] for r in SHARDS.values()], E, list(SHARDS))


def _layer_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = _batch(24, 1, 12)
    return b.hidden, b.expert_ids, b.weights


# ---- the processes (this file run as a script) ----------------------------------------------------------------------
def _store(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=LIMIT_S), wait_for_workers=False)


async def _serve_shard(rank: int, port: int) -> None:
    group = init_group(rank, WORLD, "127.0.0.1", port, "gloo", is_master=False, timeout_s=LIMIT_S)
    shard = ExpertShard.from_tensors(CFG, ASSIGN[rank], TENSORS, batching=ALONE)
    server, grpc_port = await serve_expert_shard(shard)
    store = _store(port)
    store.set(f"test/grpc/{rank}", str(grpc_port))
    collective_server, loop = CollectiveShardServer(shard, group, [WORKER]), asyncio.get_running_loop()

    def on_cue() -> None:  # the worker's cue: b stops serving, c crashes (a daemon thread: never waited for)
        store.wait([f"test/cue/{rank}"])
        if rank == SHARDS["c"]:
            os._exit(0)
        asyncio.run_coroutine_threadsafe(collective_server.stop(), loop)

    if rank != SHARDS["a"]:
        threading.Thread(target=on_cue, daemon=True).start()
    await collective_server.serve()  # until the worker closes its transport (b: until stopped)
    await server.stop(None)
    shard.close()
    group.close()


async def _outcome(call) -> tuple[str, str]:
    try:
        await call
    except Exception as e:  # noqa: BLE001 - recorded for the parent to check
        return type(e).__name__, str(e)
    return "ok", ""


async def _work(port: int, out_path: str) -> None:
    group = init_group(WORKER, WORLD, "127.0.0.1", port, "gloo", is_master=False, timeout_s=LIMIT_S)
    transport = CollectiveTransport(group, SHARDS, timeout_s=30)
    res: dict = {"health": [await transport.health(s, 10) for s in SHARDS]}
    res["replies"] = await asyncio.gather(*(transport.dispatch(s, b) for s, b in _jobs()))  # all in flight at once
    res["errors"] = [await _outcome(transport.dispatch(s, b)) for s, b in _malformed()]
    res["after_errors"] = await asyncio.gather(*(transport.dispatch(s, _batch(6, 1, 11)) for s in ("a", "b")))

    store = _store(port)
    addresses = {s: f"127.0.0.1:{store.get(f'test/grpc/{SHARDS[s]}').decode()}" for s in ("a", "b")}
    hybrid = HybridTransport({"a": "collective", "b": "grpc"}, collective=transport,
                             grpc_transport=GrpcTransport({"b": addresses["b"]}))
    both_grpc = GrpcTransport(addresses)
    batch = _hybrid_batch()
    res["hybrid"] = sum(await asyncio.gather(*(hybrid.dispatch(s, batch) for s in ("a", "b"))))
    res["grpc"] = sum(await asyncio.gather(*(both_grpc.dispatch(s, batch) for s in ("a", "b"))))
    res["hybrid_health"] = [await hybrid.health(s, 10) for s in ("a", "b")]
    await both_grpc.close()

    dispatcher = Dispatcher(transport, _expert_map())
    res["layer"] = await dispatcher(1, *_layer_input())
    await _cue(store, transport, "c")  # c crashes: its link breaks
    res["c_down"] = await _outcome(transport.dispatch("c", _batch(2)))
    res["layer_without_c"] = await dispatcher(1, *_layer_input())  # c's tokens go to a and b
    await _cue(store, transport, "b")  # b stops serving: CLOSE from its side
    res["b_stopped"] = await _outcome(transport.dispatch("b", _batch(2)))

    await hybrid.close()  # closes the collective transport too: CLOSE to every shard, a answers with its own
    res["after_close"] = await _outcome(transport.dispatch("a", _batch(2)))
    group.close()
    torch.save(res, out_path)


async def _cue(store: dist.TCPStore, transport: CollectiveTransport, shard: str) -> None:
    """Give `shard` its cue and wait until its link has ended."""
    store.set(f"test/cue/{SHARDS[shard]}", "1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a condition wait: poll until the link has ended
        if not await transport.health(shard, 1):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"shard {shard} still answers")


def _zygote(port: int, out_path: str) -> None:
    """Fork every role from this process (single-threaded here: nothing has started a thread yet), wait for them,
    exit 0 if all of them did. SIGTERM kills them."""
    zygote, children = os.getpid(), {}
    for role, rank in ROLES:
        pid = os.fork()
        if pid == 0:
            threading.Thread(target=_exit_with, args=(zygote,), daemon=True).start()
            code = 1
            try:
                torch.set_num_threads(1)
                asyncio.run(_serve_shard(rank, port) if role == "shard" else _work(port, out_path))
                code = 0
            except BaseException:  # noqa: BLE001 - reported in the log, as the exit status
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = f"{role} {rank}"
    signal.signal(signal.SIGTERM, lambda *_: _kill(children))
    codes = []
    for _ in children:
        pid, status = os.wait()
        codes.append(os.waitstatus_to_exitcode(status))
        print(f"{children[pid]}: exit {codes[-1]}", flush=True)
    sys.exit(0 if not any(codes) else 1)


def _exit_with(parent: int) -> None:
    """A forked role ends when the process that forked it is gone (nothing outlives the test)."""
    while os.getppid() == parent:  # a watchdog poll: no event tells a child its parent died
        time.sleep(0.5)
    os._exit(1)


def _kill(children: dict[int, str]) -> None:
    for pid in children:  # our own children, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(1)


# ---- the tests -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """Run the processes (the parent hosts the rendezvous store), wait for them -> the worker's results."""
    tmp = tmp_path_factory.mktemp("collective")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=LIMIT_S), wait_for_workers=False)
    with open(tmp / "processes.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(store.port), str(tmp / "out.pt")], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    timed_out = False
    try:
        proc.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # by handle, never by name; it kills its forked roles on SIGTERM
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, (f"exit {proc.returncode}{f' (killed after {LIMIT_S} s)' if timed_out else ''}:\n"
                                  + (tmp / "processes.log").read_text()[-6000:])
    return torch.load(tmp / "out.pt")


def _in_process(rank: int, batch: TokenBatch) -> torch.Tensor:
    shard = ExpertShard.from_tensors(CFG, ASSIGN[rank], TENSORS, batching=ALONE)
    try:
        return asyncio.run(shard.dispatch(batch))
    finally:
        shard.close()


def test_concurrent_replies_equal_the_in_process_shard_exactly(worker_results):
    assert worker_results["health"] == [True, True, True]
    for (shard, batch), reply in zip(_jobs(), worker_results["replies"], strict=True):
        expected = _in_process(SHARDS[shard], batch)
        assert reply.dtype == batch.hidden.dtype and reply.shape == (batch.n_tokens, D)
        assert torch.equal(reply, expected), (shard, batch.layer, batch.n_tokens)
    assert any(r.abs().max() > 0.1 for r in worker_results["replies"])  # real answers, not zeros


def test_errors_come_back_as_the_grpc_exceptions_and_the_server_keeps_serving(worker_results):
    kinds = [kind for kind, _ in worker_results["errors"]]
    texts = [text for _, text in worker_results["errors"]]
    assert kinds == ["ValueError", "ValueError", "NotHeld", "StaleExpertMap", "ValueError", "ValueError"]
    assert texts[0].startswith("hidden: shape [4, 17], expected [n, 16]")
    assert texts[1].startswith("expert_ids: values must lie in [-1, 8)")
    assert texts[2].startswith("layer: 0 is not held")
    assert texts[3].startswith("expert_map_version: request routed with -1")
    assert texts[4].startswith("weights: dtype float16 not allowed")
    assert texts[5].startswith("weights: dtype torch.float64 cannot travel")
    for shard, reply in zip(("a", "b"), worker_results["after_errors"], strict=True):  # both shards still serve
        assert torch.equal(reply, _in_process(SHARDS[shard], _batch(6, 1, 11)))


def test_hybrid_of_collective_and_grpc_equals_two_grpc_shards(worker_results):
    expected = sum(_in_process(SHARDS[s], _hybrid_batch()) for s in ("a", "b"))
    assert expected.abs().max() > 0.1
    assert torch.equal(worker_results["hybrid"], worker_results["grpc"])
    assert torch.equal(worker_results["hybrid"], expected)
    assert worker_results["hybrid_health"] == [True, True]


class _Crashed:
    async def dispatch(self, batch: TokenBatch) -> torch.Tensor:
        raise errors.Unavailable("crashed")


def _in_process_layer(crashed_c: bool) -> torch.Tensor:
    shards = {s: ExpertShard.from_tensors(CFG, ASSIGN[r], TENSORS, batching=ALONE) for s, r in SHARDS.items()}
    if crashed_c:
        shards["c"] = _Crashed()
    return asyncio.run(Dispatcher(InProcessTransport(shards), _expert_map())(1, *_layer_input()))


def test_dispatcher_over_it_equals_in_process_also_when_a_shard_crashes(worker_results):
    with torch.no_grad():  # the layer's full bank: what the three shards add up to
        full = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS).banks[1](*_layer_input())
    assert torch.equal(worker_results["layer"], _in_process_layer(crashed_c=False))
    torch.testing.assert_close(worker_results["layer"], full)
    kind, text = worker_results["c_down"]
    assert kind == "Unavailable" and "link broke" in text, text
    assert torch.equal(worker_results["layer_without_c"], _in_process_layer(crashed_c=True))
    torch.testing.assert_close(worker_results["layer_without_c"], full)


def test_stopped_shard_and_closed_transport_raise_unavailable(worker_results):
    kind, text = worker_results["b_stopped"]
    assert kind == "Unavailable" and "the shard closed its link" in text, text
    kind, text = worker_results["after_close"]
    assert kind == "Unavailable" and "the transport is closed" in text, text


def test_links_from_groups_known_answer():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]  # e.g. Plan.expert_groups: two nodes of four devices
    shard_devices = {"s0": 0, "s3": 3, "s4": 4, "s7": 7, "outside": 9}
    assert links_from_groups(groups, 2, shard_devices) == {"s0": "collective", "s3": "collective", "s4": "grpc",
                                                            "s7": "grpc", "outside": "grpc"}
    assert links_from_groups(groups, 5, shard_devices) == {"s0": "grpc", "s3": "grpc", "s4": "collective",
                                                            "s7": "collective", "outside": "grpc"}
    assert set(links_from_groups(groups, 8, shard_devices).values()) == {"grpc"}  # worker outside every group
    with pytest.raises(ValueError, match="groups: device 3 is in group 0 and group 1"):
        links_from_groups([[0, 3], [3, 4]], 0, shard_devices)


def test_hybrid_transport_checks_its_links():
    grpc_part = GrpcTransport({"b": "127.0.0.1:1"})
    with pytest.raises(ValueError, match=r"links\['a'\]: 'nccl' is not one of"):
        HybridTransport({"a": "nccl"}, grpc_transport=grpc_part)
    with pytest.raises(ValueError, match=r"links\['a'\]: 'collective', but the collective transport does not"):
        HybridTransport({"a": "collective", "b": "grpc"}, grpc_transport=grpc_part)
    with pytest.raises(ValueError, match="shard: unknown destination 'c'"):
        asyncio.run(HybridTransport({"b": "grpc"}, grpc_transport=grpc_part).dispatch("c", _batch(1)))


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_hccl_without_torch_npu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend: 'hccl' needs torch_npu"):
        init_group(0, 2, "127.0.0.1", 1, "hccl")  # fails before any rendezvous


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_nccl_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend: 'nccl' needs CUDA GPUs"):
        init_group(0, 2, "127.0.0.1", 1, "nccl")
    with pytest.raises(ValueError, match=r"backend: 'mpi' unknown"):
        collective_link.check_backend("mpi")


def test_framing_round_trip_and_checks():
    hidden = torch.randn(3, D).to(torch.bfloat16)
    ids, weights = torch.randint(-1, E, (3, K), dtype=torch.int32), torch.rand(3, K)
    header, parts = collective_link.encode(collective_link.REQUEST, (hidden, ids, weights),
                                           collective_link.REQUEST_FIELDS, request_id=7, layer=2, step_id=5, version=-1)
    h = header.tolist()
    collective_link.check_header(h, 1 << 20)
    raws = [p.clone() for p in parts]  # what the receiver gets: fresh byte buffers
    got = collective_link.decode(h, raws, collective_link.REQUEST_FIELDS)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, (hidden, ids, weights), strict=True))
    assert (h[2], h[4], h[5], h[6]) == (7, 2, 5, -1)  # request id, layer, step, expert map version
    with pytest.raises(collective_link.BrokenStream, match="payload sizes"):
        collective_link.check_header(h, 10)
    with pytest.raises(collective_link.BrokenStream, match="not a moemesh collective header"):
        collective_link.check_header([0] * collective_link.HEADER, 1 << 20)
    wrong = list(h)
    wrong[collective_link._P + 4 + 3] -= 4  # expert_ids says 4 bytes fewer than its shape needs
    with pytest.raises(ValueError, match=r"expert_ids\.data: 32 bytes, but shape \[3, 3\]"):
        collective_link.decode(wrong, raws, collective_link.REQUEST_FIELDS)
    with pytest.raises(ValueError, match=r"message: 3 tensors, expected 1 \(output\)"):
        collective_link.decode(h, raws, collective_link.REPLY_FIELDS)
    with pytest.raises(ValueError, match="hidden: shape \\[16\\], expected 2 dimensions"):
        collective_link.encode(collective_link.REQUEST, (torch.zeros(D), ids, weights), collective_link.REQUEST_FIELDS)


def test_error_replies_map_like_grpc():
    cases = [(ValueError("hidden: bad"), ValueError, "hidden: bad"), (errors.NotHeld("layer: 9"), errors.NotHeld,
              "layer: 9"), (errors.Overloaded("busy"), errors.Overloaded, "busy"), (KeyError("k"), ValueError, "k"),
             (errors.Unavailable("closed"), errors.Unavailable, "closed")]
    for exc, kind, message in cases:
        header, parts = collective_link._error_message(3, exc)
        h = header.tolist()
        text = bytes(collective_link.decode(h, parts, collective_link.ERROR_FIELDS)[0].reshape(-1).tolist()).decode()
        back = errors.exception_for(collective_link._STATUS_CODES[h[collective_link._STATUS]], text)
        assert (type(back), str(back), h[collective_link._ID]) == (kind, message, 3)


if __name__ == "__main__":
    _zygote(int(sys.argv[1]), sys.argv[2])
