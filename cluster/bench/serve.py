"""`moemesh bench serve`: the served cluster against the in-process monolithic engine, same checkpoint, same load.

For each concurrency level, `concurrency` clients each send requests back to back (streaming), and we report decode
throughput (completion tokens / wall time), TTFT and TPOT p50/p99. The served path goes over HTTP through the
ingress, attention workers and gRPC shards; the monolithic path drives one in-process `AsyncEngine` holding the whole
model (no HTTP, no gRPC). A third measurement isolates the Engram lookup inside one attention-worker step.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from dataclasses import dataclass

import httpx
import torch

from moemesh.cluster.bench.report import write_section


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft: list[float]
    tpot: list[float]

    @property
    def decode_tok_s(self) -> float:
        return self.tokens / self.wall_s

    def row(self, path: str) -> str:
        return (f"| {path} | {self.concurrency} | {self.requests} | {self.decode_tok_s:.1f} | "
                f"{_pct(self.ttft, 50):.3f} | {_pct(self.ttft, 99):.3f} | {_pct(self.tpot, 50) * 1e3:.1f} | "
                f"{_pct(self.tpot, 99) * 1e3:.1f} |")


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


async def _drive(one, prompt_list: list[list[int]], concurrency: int) -> LoadResult:
    """`one(prompt) -> (ttft, token times)`; `concurrency` clients take prompts from a shared queue."""
    queue = list(prompt_list)
    ttft, tpot, tokens = [], [], 0

    async def client():
        nonlocal tokens
        while queue:
            first, n, total = await one(queue.pop())
            ttft.append(first)
            tokens += n
            if n > 1:
                tpot.append((total - first) / (n - 1))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LoadResult(concurrency, len(prompt_list), tokens, time.perf_counter() - start, ttft, tpot)


def http_one(url: str, model: str, max_tokens: int, api_key: str | None = None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        start, first, n = time.perf_counter(), None, 0
        async with httpx.AsyncClient(timeout=600) as client:
            async with client.stream("POST", f"{url}/completions", json=body, headers=headers) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                        first = first or time.perf_counter() - start
                        n += 1
        return first or 0.0, n, time.perf_counter() - start
    return one


def engine_one(engine, max_tokens: int):
    from moemesh.actors.request import RequestParams

    counter = iter(range(1 << 62))

    async def one(prompt):
        start, first, n = time.perf_counter(), None, 0
        params = RequestParams(max_tokens=max_tokens, ignore_eos=True)
        async for out in engine.generate(f"bench-{next(counter)}", prompt, params):
            if out.new_token_ids:
                first = first or time.perf_counter() - start
                n += len(out.new_token_ids)
        return first or 0.0, n, time.perf_counter() - start
    return one


def machine() -> str:
    """This machine in one line: CPU, OS, torch and the accelerators torch can use (found, not assumed)."""
    import os

    from moemesh.kernels.device import local_accelerators

    accelerators = ", ".join(f"{n:g} {kind}" for kind, n in local_accelerators().items() if n) or "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch " \
           f"{torch.__version__}, {accelerators}"


TABLE_HEAD = ("| path | concurrency | requests | decode tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms |\n"
              "|---|---|---|---|---|---|---|---|")


# ---- the three measurements ----------------------------------------------------------------------------------------
async def bench_monolithic(model_dir: str, levels: list[int], per_client: int, prompt_len: int,
                           max_tokens: int) -> list[LoadResult]:
    from moemesh.actors.attention.engine import AsyncEngine, CacheConfig, Engine
    from moemesh.actors.attention.scheduler import SchedulerConfig
    from moemesh.kernels.model import load_model

    model = load_model(model_dir)
    engine = AsyncEngine(Engine(model, CacheConfig(num_blocks=8192, block_size=16),
                                SchedulerConfig(max_num_seqs=max(levels))))
    try:
        return [await _drive(engine_one(engine, max_tokens),
                             prompts(c * per_client, prompt_len, model.config.vocab_size, seed=c), c) for c in levels]
    finally:
        await engine.shutdown()


def bench_served(config, levels: list[int], per_client: int, prompt_len: int, max_tokens: int,
                 vocab: int) -> list[LoadResult]:
    from moemesh.cluster.serve.app import deploy

    url = deploy(config)
    keys = config.ingress.api_key_list()
    one = http_one(url, config.ingress.model_name or "tiny", max_tokens, keys[0] if keys else None)

    async def all_levels():
        await _drive(one, prompts(2, prompt_len, vocab, seed=99), 2)  # warm-up: first requests load lazily
        return [await _drive(one, prompts(c * per_client, prompt_len, vocab, seed=c), c) for c in levels]

    return asyncio.run(all_levels())


def bench_engram_step(model_dir: str, batch: int = 8, prompt_len: int = 64, steps: int = 40) -> dict[str, float]:
    """Median decode-step time (batch sequences) of an attention worker's step: Engram rows from local tables (no
    service), from the Engram service over gRPC with the hot-row cache off, and with it on (warm)."""
    from moemesh.actors.attention.remote_step import RemoteStep
    from moemesh.actors.attention.token_dispatch import Dispatcher, ExpertMap
    from moemesh.actors.engram.client import EngramClient, EngramClientConfig, EngramRoute, GrpcEngramTransport
    from moemesh.actors.engram.service import engram_layout
    from moemesh.actors.io_loop import IoLoop
    from moemesh.cluster.serve.hosts import EngramShardHost, ExpertShardHost
    from moemesh.kernels.model import load_model
    from moemesh.proto.transport import GrpcTransport

    model = load_model(model_dir, with_experts=False)
    cfg = model.config
    assignment = [{layer: list(range(s, cfg.n_routed_experts, 2)) for layer in range(cfg.num_hidden_layers)}
                  for s in range(2)]
    experts = [ExpertShardHost(model_dir, held) for held in assignment]
    engram = [EngramShardHost(model_dir, ranges) for ranges in engram_layout(cfg, 2)]
    io = IoLoop("bench-io")
    dispatcher = Dispatcher(GrpcTransport({i: h.grpc_address() for i, h in enumerate(experts)}),
                            ExpertMap.from_assignment(assignment, cfg.n_routed_experts))
    routes = [EngramRoute(h.shard.ranges, [f"e{i}"]) for i, h in enumerate(engram)]
    transport = GrpcEngramTransport({f"e{i}": h.grpc_address() for i, h in enumerate(engram)})

    async def local(hash_ids):
        return model.lookup_engram(hash_ids)

    lookups = {"local tables (no service)": local,
               "Engram service, cache off": EngramClient(cfg, routes, transport,
                                                         EngramClientConfig(cache_rows=0)).lookup,
               "Engram service, hot-row cache on": EngramClient(cfg, routes, transport,
                                                                EngramClientConfig(cache_rows=65536)).lookup}
    # the variants take turns step by step, so drift in machine load hits them alike
    runs = {name: (RemoteStep(model, dispatcher, lookup, io), [model.new_cache() for _ in range(batch)],
                   prompts(batch, prompt_len, cfg.vocab_size, seed=7), []) for name, lookup in lookups.items()}
    try:
        for _ in range(steps + 1):
            for name, (step, caches, feed, times) in runs.items():
                start = time.perf_counter()
                hidden = step(feed, caches)
                times.append(time.perf_counter() - start)
                last = torch.cumsum(torch.tensor([len(f) for f in feed]), 0) - 1
                feed[:] = [[t] for t in model.logits(hidden[last]).argmax(-1).tolist()]
        out = {name: statistics.median(times[1:]) for name, (_, _, _, times) in runs.items()}  # [0]: prefill
    finally:
        io.close()
        for host in experts + engram:
            host.shutdown()
    return out


def shard_memory(model_dir: str, n_shards: int, app_name: str | None = None) -> list[dict]:
    """Issue 14's `shards` list for a deployed app: per expert shard deployment, `ExpertShardHost.memory()` of its
    replica ({expert_bytes: packed expert weights held, scratch_bytes, rss_bytes, peak_rss_bytes}) plus
    `empty_rss_bytes`: the RSS of a shard process with no experts loaded (an `ExpertShardHost` with an empty
    assignment, started as a Ray actor with the roles' environment, measured, and killed). Call while the app runs
    (after the load, before teardown); target: rss_bytes <= 1.25 x expert_bytes + empty_rss_bytes."""
    import ray
    from ray import serve

    from moemesh.cluster.names import APP_NAME, expert_shard
    from moemesh.cluster.serve.edge import ROLE_ENV
    from moemesh.cluster.serve.hosts import ExpertShardHost

    rows = []
    for i in range(n_shards):
        handle = serve.get_deployment_handle(expert_shard(i), app_name=app_name or APP_NAME)
        rows.append({"name": expert_shard(i), **handle.memory.remote().result(timeout_s=120)})
    empty = ray.remote(ExpertShardHost).options(num_cpus=0, runtime_env={"env_vars": dict(ROLE_ENV)}).remote(
        model_dir, {})
    try:
        empty_rss = ray.get(empty.memory.remote(), timeout=120)["rss_bytes"]
    finally:
        ray.kill(empty)
    return [{**row, "empty_rss_bytes": empty_rss} for row in rows]


def shard_table(shards: list[dict]) -> str:
    MiB = 2 ** 20
    lines = ["", "Expert shard memory after the run (experts kept packed as stored; target: RSS <= 1.25 x expert "
             "bytes + the RSS of a shard process holding no experts):", "",
             "| shard | expert MiB | RSS MiB | empty shard RSS MiB | RSS / (1.25 x expert + empty) |",
             "|---|---|---|---|---|"]
    for s in shards:
        bound = 1.25 * s["expert_bytes"] + s["empty_rss_bytes"]
        lines.append(f"| {s['name']} | {s['expert_bytes'] / MiB:.1f} | {s['rss_bytes'] / MiB:.1f} | "
                     f"{s['empty_rss_bytes'] / MiB:.1f} | {s['rss_bytes'] / bound:.2f} |")
    return "\n".join(lines) + "\n"


def report(levels, served: list[LoadResult], mono: list[LoadResult], engram: dict[str, float], command: str,
           settings: str) -> str:
    lines = ["## Serving (`moemesh bench serve`)", "", f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Load: {settings}", "", TABLE_HEAD]
    for s, m in zip(served, mono):
        lines += [s.row("served cluster (HTTP + gRPC)"), m.row("in-process monolithic engine")]
    ratio = ", ".join(f"c={s.concurrency}: {s.decode_tok_s / m.decode_tok_s:.2f}x" for s, m in zip(served, mono))
    lines += ["", f"Served / monolithic decode throughput: {ratio}.", "",
              "Decode step of one attention worker (8 sequences, experts on 2 gRPC shards), median of 40 steps, the "
              "three variants taking turns:", "",
              "| Engram rows from | step ms |", "|---|---|"]
    lines += [f"| {name} | {t * 1e3:.1f} |" for name, t in engram.items()]
    return "\n".join(lines) + "\n"


def run(config, levels: list[int], per_client: int, prompt_len: int, max_tokens: int, write: str | None,
        command: str) -> str:
    from moemesh.cluster.serve.app import resolve_model
    from moemesh.kernels.config import ModelConfig

    model_dir = resolve_model(config.model)
    config = config.model_copy(update={"model": model_dir})
    vocab = ModelConfig.from_file(model_dir).vocab_size
    mono = asyncio.run(bench_monolithic(model_dir, levels, per_client, prompt_len, max_tokens))
    engram = bench_engram_step(model_dir)
    served = bench_served(config, levels, per_client, prompt_len, max_tokens, vocab)
    settings = (f"{per_client} requests per client, prompt {prompt_len} tokens, {max_tokens} new tokens, greedy; "
                f"served: {config.attention.replicas} attention worker(s), "
                f"{config.experts.shards or len(config.experts.assignment)} expert shards, "
                f"{config.engram.shards}x{config.engram.replicas} Engram shards, all on this machine")
    shards = shard_memory(model_dir, config.experts.shards or len(config.experts.assignment))
    text = report(levels, served, mono, engram, command, settings) + shard_table(shards)
    if write:
        write_section(write, text)
    return text
