"""`moemesh bench serve`: the served cluster against the in-process monolithic engine, same checkpoint, same load.

For each concurrency level, `concurrency` clients each send requests back to back (streaming), and we report decode
throughput (completion tokens / wall time), TTFT and TPOT p50/p99, and the mean step's breakdown. The served path
goes over HTTP through the ingress, attention workers and gRPC shards, once per `--micro-batches` setting (switched
live on the running workers); the monolithic path drives one in-process `AsyncEngine` holding the whole model (no
HTTP, no gRPC). For a model with Engram, a third measurement isolates the Engram lookup inside one attention-worker
step; the shards' memory closes the run. Output: cluster/bench/serve_report.py.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
from pathlib import Path

import httpx
import torch

from moemesh.cluster.bench.report import write_section
from moemesh.cluster.bench.serve_report import LoadResult, Run, as_json, engram_summary, markdown, step_breakdown


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


async def _drive(one, prompt_list: list[list[int]], concurrency: int) -> LoadResult:
    """`one(prompt) -> (ttft, token times)`; `concurrency` clients take prompts from a shared queue."""
    queue = list(prompt_list)[::-1]  # popped from the end: in order
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


# ---- the measurements ------------------------------------------------------------------------------------------------
async def bench_monolithic(model_dir: str, name: str, levels: list[int], per_client: int, prompt_len: int,
                           max_tokens: int) -> list[Run]:
    from moemesh.actors.attention.engine import AsyncEngine, CacheConfig, Engine
    from moemesh.actors.attention.scheduler import SchedulerConfig
    from moemesh.kernels.model import load_model

    model = load_model(model_dir)
    engine = AsyncEngine(Engine(model, CacheConfig(num_blocks=8192, block_size=16),
                                SchedulerConfig(max_num_seqs=max(levels))))
    clock, runs = engine.engine.clock, []
    # One intra-op thread: AsyncEngine steps in a worker thread, where torch's OpenMP parallel regions cost about 3x
    # per small op what they cost on the main thread (a v4-flash-mini decode step of 8 sequences: 1.6 s with 2
    # threads there, 0.40 s with 1; on the main thread 0.40 s with either), so this is the engine at its best here.
    # The served roles run with OMP_NUM_THREADS=1 too (cluster/serve/edge.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        await _drive(engine_one(engine, max_tokens), prompts(2, prompt_len, model.config.vocab_size, seed=99), 2)
        for c in levels:
            before = (clock.steps, clock.total_s, clock.model_s)
            load = await _drive(engine_one(engine, max_tokens),
                                prompts(c * per_client, prompt_len, model.config.vocab_size, seed=c), c)
            steps = max(clock.steps - before[0], 1)
            total, compute = (1e3 * (now - then) / steps for now, then in zip((clock.total_s, clock.model_s),
                                                                               before[1:]))
            runs.append(Run("monolithic", name, None, load, {"step_ms": total, "compute_ms": compute,
                                                             "scheduling_ms": max(total - compute, 0.0)}))
    finally:
        await engine.shutdown()
        torch.set_num_threads(threads)
    return runs


class ServedApp:
    """The deployed app's attention workers and expert shards, through their Serve handles."""

    def __init__(self, config):
        from ray import serve

        from moemesh.cluster.names import APP_NAME, attention_worker, expert_shard

        self.workers = [serve.get_deployment_handle(attention_worker(k), app_name=APP_NAME)
                        for k in range(config.attention.replicas)]
        shards = config.experts.shards or len(config.experts.assignment)
        self.shards = [serve.get_deployment_handle(expert_shard(i), app_name=APP_NAME) for i in range(shards)]

    async def set_micro_batches(self, n: int) -> None:
        for w in self.workers:
            await w.set_micro_batches.remote(n)

    async def counters(self) -> tuple[dict, float]:
        """(summed worker step counters, summed shard compute seconds)."""
        parts: dict[str, float] = {}
        for w in self.workers:
            for k, v in (await w.stats.remote())["step"].items():
                parts[k] = parts.get(k, 0) + v
        compute = sum([(await s.stats.remote()).get("compute_s", 0.0) for s in self.shards])
        return parts, compute

    async def busiest_trace(self, stop: asyncio.Event, every_s: float = 0.5) -> dict | None:
        """Poll worker 0's last step timeline until `stop` -> the one of the step with the most sequences (decode
        steps preferred: one token per sequence)."""
        best = None
        while not stop.is_set():
            trace = await self.workers[0].last_step_trace.remote()
            key = (trace["tokens"] == trace["sequences"], trace["sequences"])
            if trace["events"] and (best is None or key > best[0]):
                best = (key, trace)
            await asyncio.sleep(every_s)
        return best[1] if best else None


def bench_served(config, name: str, levels: list[int], micro_batches: list[int], per_client: int, prompt_len: int,
                 max_tokens: int, vocab: int, timeline: str | None = None) -> tuple[list[Run], list[dict]]:
    """Each micro-batch setting x concurrency level on one deployment; `timeline`: draw a busy step of the last run
    there (cluster/bench/timeline.py)."""
    from moemesh.cluster.serve.app import deploy

    url = deploy(config)
    keys = config.ingress.api_key_list()
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    served_name = httpx.get(f"{url}/models", headers=headers, timeout=60).json()["data"][0]["id"]
    one = http_one(url, served_name, max_tokens, keys[0] if keys else None)
    app = ServedApp(config)

    async def all_runs():
        await _drive(one, prompts(2, prompt_len, vocab, seed=99), 2)  # warm-up: first requests load lazily
        runs = []
        for mb in micro_batches:
            await app.set_micro_batches(mb)
            for c in levels:
                last = mb == micro_batches[-1] and c == levels[-1]
                stop = asyncio.Event()
                watch = asyncio.ensure_future(app.busiest_trace(stop)) if timeline and last else None
                before, shard_before = await app.counters()
                load = await _drive(one, prompts(c * per_client, prompt_len, vocab, seed=c), c)
                after, shard_after = await app.counters()
                runs.append(Run("served", name, mb, load, step_breakdown(before, after, shard_after - shard_before)))
                if watch is not None:
                    stop.set()
                    _draw(await watch, timeline, name)
        return runs

    runs = asyncio.run(all_runs())
    return runs, shard_memory(len(app.shards))


def _draw(trace: dict | None, path: str, model: str) -> None:
    from moemesh.cluster.bench.timeline import render

    if trace is None:
        raise RuntimeError("--timeline: no step was traced during the run")
    kind = "decode" if trace["tokens"] == trace["sequences"] else f"{trace['tokens']} tokens"
    render([tuple(e) for e in trace["events"]], path,
           f"One served step of {model}: {trace['sequences']} sequences ({kind}), {trace['micro_batches']} "
           f"micro-batch(es), as recorded by the attention worker\n{machine()}")


def bench_engram_step(model_dir: str, batch: int = 8, prompt_len: int = 64, steps: int = 40) -> dict[str, float]:
    """An attention worker's decode step (batch sequences, experts on 2 gRPC shards): Engram rows from local tables
    (no service), from the Engram service over gRPC with the hot-row cache on (as deployed) and off; the variants
    take turns step by step, so drift in machine load hits them alike. -> `serve_report.engram_summary`."""
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

    lookups = {"local": local,
               "service": EngramClient(cfg, routes, transport, EngramClientConfig(cache_rows=65536)).lookup,
               "service_no_cache": EngramClient(cfg, routes, transport, EngramClientConfig(cache_rows=0)).lookup}
    runs = {name: (RemoteStep(model, dispatcher, lookup, io), [model.new_cache() for _ in range(batch)],
                   prompts(batch, prompt_len, cfg.vocab_size, seed=7), []) for name, lookup in lookups.items()}
    waits = []
    try:
        for i in range(steps + 1):
            for name, (step, caches, feed, times) in runs.items():
                start = time.perf_counter()
                hidden = step(feed, caches)
                times.append(time.perf_counter() - start)
                if name == "service" and i:
                    waits.append(step.last.wait_engram)
                last = torch.cumsum(torch.tensor([len(f) for f in feed]), 0) - 1
                feed[:] = [[t] for t in model.logits(hidden[last]).argmax(-1).tolist()]
        return engram_summary({name: times[1:] for name, (_, _, _, times) in runs.items()}, waits)  # [0]: prefill
    finally:
        io.close()
        for host in experts + engram:
            host.shutdown()


def shard_memory(n_shards: int, app_name: str | None = None) -> list[dict]:
    """Issue 14's `shards` list for a deployed app: per expert shard deployment, `ExpertShardHost.memory()` of its
    replica: expert_bytes (packed expert weights held), scratch_bytes, rss_bytes, peak_rss_bytes, and empty_rss_bytes
    (the same process before it loaded any expert). Call while the app runs (after the load, before teardown);
    target: rss_bytes <= 1.25 x expert_bytes + empty_rss_bytes."""
    from ray import serve

    from moemesh.cluster.names import APP_NAME, expert_shard

    return [{"name": expert_shard(i), **serve.get_deployment_handle(expert_shard(i), app_name=app_name or APP_NAME)
             .memory.remote().result(timeout_s=120)} for i in range(n_shards)]


def run(config, levels: list[int], per_client: int, prompt_len: int, max_tokens: int, write: str | None,
        command: str, micro_batches: list[int] | None = None, json_path: str | None = None,
        model: str | None = None, timeline: str | None = None) -> str:
    """Everything above on one model (`model`: a built-in name or a checkpoint path; default the config's) ->
    the markdown section (also written to `write`); `json_path` gets the JSON."""
    from moemesh.cluster.serve.app import resolve_model
    from moemesh.kernels.config import ModelConfig

    name = model or config.model
    model_dir = resolve_model(name)
    config = config.model_copy(update={"model": model_dir})
    micro_batches = micro_batches or [config.attention.micro_batches]
    mcfg = ModelConfig.from_file(model_dir)
    mono = asyncio.run(bench_monolithic(model_dir, name, levels, per_client, prompt_len, max_tokens))
    engram = bench_engram_step(model_dir) if mcfg.has_engram else None
    served, shards = bench_served(config, name, levels, micro_batches, per_client, prompt_len, max_tokens,
                                  mcfg.vocab_size, timeline)
    load = (f"model {name}; {per_client} requests per client, prompt {prompt_len} tokens, {max_tokens} new tokens, "
            f"greedy; served: {config.attention.replicas} attention worker(s), "
            f"{config.experts.shards or len(config.experts.assignment)} expert shards, "
            f"{config.engram.shards}x{config.engram.replicas} Engram shards, all on this machine")
    runs = [r for c in levels for r in [*(m for m in mono if m.load.concurrency == c),
                                         *(s for s in served if s.load.concurrency == c)]]
    if json_path:
        Path(json_path).write_text(as_json(runs, engram, shards, machine(), command, load))
    text = markdown(runs, engram, shards, machine(), command, load)
    if write:
        write_section(write, text)
    return text
