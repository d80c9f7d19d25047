"""`moemesh bench soak`: steady load on a served cluster for N minutes; RSS of every role at start and end.

After a warm-up, the resident memory of every process is read from its Prometheus `process_resident_memory_bytes`:
the ingress's own `/metrics`, and every other role's endpoint listed by the ingress's `/metrics/targets` (Prometheus
HTTP service discovery). Then `concurrency` clients send small greedy requests back to back until the time is up,
and RSS is read again. The target is < 5 % growth per process after warm-up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from moemesh.cluster.bench.report import write_section
from moemesh.cluster.bench.serve import http_one, machine, prompts

RSS_METRIC = "process_resident_memory_bytes"
TARGET_GROWTH_PCT = 5.0
HEADING = "## Soak (`moemesh bench soak`)"


# ---- pure parts ------------------------------------------------------------------------------------------------------
def parse_rss(text: str) -> float | None:
    """`process_resident_memory_bytes` from a Prometheus text exposition (None when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        if name.split("{", 1)[0] == RSS_METRIC and rest.strip():
            return float(rest.split()[0])
    return None


def metrics_urls(targets: list[dict]) -> list[tuple[str, str]]:
    """(label, /metrics URL) per target of a Prometheus HTTP-SD list; labels made unique (`name`, `name#2`, ...)."""
    out, seen = [], {}
    for entry in targets:
        name = entry.get("labels", {}).get("deployment", "?")
        for target in entry.get("targets", []):
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}#{seen[name]}"
            out.append((label, f"http://{target}/metrics"))
    return out


def growth_pct(start: float, end: float) -> float:
    return (end - start) / start * 100.0 if start else float("nan")


@dataclass
class SoakResult:
    rss_start: dict[str, float | None]
    rss_end: dict[str, float | None]
    completed: int
    failed: int
    tokens: int
    wall_s: float


def table(result: SoakResult) -> list[str]:
    lines = ["| process | RSS start MB | RSS end MB | growth % |", "|---|---|---|---|"]
    for name in sorted(set(result.rss_start) | set(result.rss_end)):
        a, b = result.rss_start.get(name), result.rss_end.get(name)
        g = f"{growth_pct(a, b):+.2f}" if a is not None and b is not None else "n/a"
        lines.append(f"| {name} | {_mb(a)} | {_mb(b)} | {g} |")
    return lines


def _mb(v: float | None) -> str:
    return f"{v / 2**20:.1f}" if v is not None else "n/a"


def max_growth(result: SoakResult) -> float:
    gs = [growth_pct(a, result.rss_end[n]) for n, a in result.rss_start.items()
          if a is not None and result.rss_end.get(n) is not None]
    return max(gs) if gs else float("nan")


# ---- the measurement -------------------------------------------------------------------------------------------------
async def read_rss(root: str, headers: dict) -> dict[str, float | None]:
    """RSS in bytes of the ingress and every role listed by its `/metrics/targets`."""
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        r = await client.get(f"{root}/metrics/targets")
        r.raise_for_status()
        urls = [("ingress", f"{root}/metrics")] + metrics_urls(r.json())
        out = {}
        for label, url in urls:
            try:
                resp = await client.get(url)
                resp.raise_for_status()
                out[label] = parse_rss(resp.text)
            except httpx.HTTPError:
                out[label] = None
        return out


async def steady_load(one, seconds: float, concurrency: int, prompt_len: int, vocab: int) -> tuple[int, int, int]:
    """`concurrency` clients send requests back to back until `seconds` pass; (completed, failed, tokens)."""
    pool = prompts(64, prompt_len, vocab, seed=1)
    completed = failed = tokens = 0
    deadline = time.monotonic() + seconds

    async def client(i: int):
        nonlocal completed, failed, tokens
        k = i
        while time.monotonic() < deadline:
            try:
                _, n, _ = await asyncio.wait_for(one(pool[k % len(pool)]), timeout=120)
                completed += 1
                tokens += n
            except Exception:  # noqa: BLE001 - any failure counts, the soak goes on
                failed += 1
            k += concurrency

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return completed, failed, tokens


def run(config, minutes: float, write: str | None, command: str, concurrency: int = 8, prompt_len: int = 16,
        max_tokens: int = 8, warmup_s: float = 20.0) -> str:
    import ray
    from ray import serve

    from moemesh.cluster.serve.app import deploy, resolve_model
    from moemesh.kernels.config import ModelConfig

    model_dir = resolve_model(config.model)
    config = config.model_copy(update={"model": model_dir})
    vocab = ModelConfig.from_file(model_dir).vocab_size
    keys = config.ingress.api_key_list()
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    try:
        url = deploy(config)
        root = url.removesuffix("/v1")
        one = http_one(url, config.ingress.model_name or "tiny", max_tokens, keys[0] if keys else None)

        async def soak() -> SoakResult:
            await steady_load(one, warmup_s, concurrency, prompt_len, vocab)
            start = await read_rss(root, headers)
            t0 = time.perf_counter()
            completed, failed, tokens = await steady_load(one, minutes * 60, concurrency, prompt_len, vocab)
            wall = time.perf_counter() - t0
            end = await read_rss(root, headers)
            return SoakResult(start, end, completed, failed, tokens, wall)

        result = asyncio.run(soak())
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    text = report(result, minutes, command, concurrency, prompt_len, max_tokens, warmup_s)
    if write:
        write_section(write, text)
    return text


def report(result: SoakResult, minutes: float, command: str, concurrency: int, prompt_len: int, max_tokens: int,
           warmup_s: float) -> str:
    worst = max_growth(result)
    verdict = "met" if worst < TARGET_GROWTH_PCT else "NOT met"
    lines = [HEADING, "", f"Command: `{command}`  ", f"Machine: {machine()}  ",
             (f"Load: {concurrency} concurrent clients, greedy streaming requests back to back, prompt {prompt_len} "
              f"tokens, {max_tokens} new tokens; {warmup_s:.0f} s of the same load as warm-up before the first RSS "
              f"reading; soak {minutes:g} min ({result.wall_s:.0f} s measured)."), "",
             (f"RSS is `{RSS_METRIC}` of each process: the ingress's `/metrics` and every role listed by its "
              f"`/metrics/targets`. The issue's target run is **10 minutes** (`moemesh bench soak --minutes 10`) "
              f"with < {TARGET_GROWTH_PCT:g} % growth after warm-up; this was a **{minutes:g}-minute** run."), ""]
    lines += table(result)
    lines += ["", (f"Requests: {result.completed} completed, {result.failed} failed ({max_tokens} new tokens each, "
                   f"`ignore_eos`; {result.completed / result.wall_s:.2f} requests/s). "
                   f"Largest growth: {worst:+.2f} % (target < {TARGET_GROWTH_PCT:g} %: {verdict}).")]
    return "\n".join(lines) + "\n"
