"""`moemesh bench chunked`: what a long prompt arriving does to the decode streams already running, with chunked
prefill off and on (in-process engine, one thread, so the step is the only thing measured).

`streams` requests decode `decode_tokens` tokens each; at step `arrive_at` a `long_len`-token prompt joins. Without
chunking its whole prefill is one step, and every running stream waits for it; with chunking the step holds at most
`max_num_batched_tokens` tokens (decode tokens first), so the prompt is spread over several steps. Reported per
setting: the gaps between consecutive tokens of the running streams after the arrival (TPOT p50 / p99 / the longest
gap) and the long prompt's time to first token; the tokens of every setting must be the same (chunked prefill is
exact: docs/scheduling.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moemesh.cluster.bench.report import write_section

SETTINGS = ((False, None), (True, 256), (True, 2048))  # (chunked_prefill, max_num_batched_tokens); 2048: the default


@dataclass
class Stalls:
    chunked: bool
    budget: int | None
    tpot_ms: list[float]
    long_ttft_ms: float
    long_steps: int  # steps from the long prompt's arrival to its first token (its prefill's chunks)
    tokens: dict[str, list[int]]

    def row(self) -> str:
        t = torch.tensor(self.tpot_ms)
        budget = "no limit" if self.budget is None else str(self.budget)
        return (f"| {'on' if self.chunked else 'off'} | {budget} | {t.quantile(0.5):.1f} | {t.quantile(0.99):.1f} | "
                f"{t.max():.1f} | {self.long_ttft_ms:.0f} |")


def measure(model, chunked: bool, budget: int | None, streams: int = 4, decode_tokens: int = 120,
            long_len: int = 3000, arrive_at: int = 20) -> Stalls:
    from moemesh.actors.attention.engine import Engine
    from moemesh.actors.attention.scheduler import SchedulerConfig
    from moemesh.actors.request import RequestParams

    engine = Engine(model, scheduler=SchedulerConfig(max_num_seqs=streams + 2, chunked_prefill=chunked,
                                                     max_num_batched_tokens=budget),
                    max_model_len=long_len + 64)
    g, V = torch.Generator().manual_seed(0), model.config.vocab_size
    for i in range(streams):
        engine.add_request(f"d{i}", torch.randint(3, V, (32,), generator=g).tolist(),
                           RequestParams(max_tokens=decode_tokens, ignore_eos=True))
    last, gaps, tokens, step, arrived = {}, [], {}, 0, None
    while engine.has_unfinished():
        if step == arrive_at:
            engine.add_request("long", torch.randint(3, V, (long_len,), generator=g).tolist(),
                               RequestParams(max_tokens=1, ignore_eos=True))
            arrived = time.perf_counter()
        outputs, now = engine.step(), time.perf_counter()
        step += 1
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.request_id == "long":
                long_ttft, long_steps = now - arrived, step - arrive_at
            elif arrived is not None and out.request_id in last:
                gaps.append(1e3 * (now - last[out.request_id]))
            last[out.request_id] = now
    return Stalls(chunked, budget, gaps, 1e3 * long_ttft, long_steps, tokens)


def run(model_name: str, long_len: int, write: str | None, command: str) -> str:
    from moemesh.cluster.bench.serve import machine
    from moemesh.cluster.serve.app import resolve_model
    from moemesh.kernels.model import load_model

    torch.set_num_threads(1)
    model = load_model(resolve_model(model_name))
    results = [measure(model, chunked, budget, long_len=long_len) for chunked, budget in SETTINGS]
    same = all(r.tokens == results[0].tokens for r in results)
    lines = ["## Chunked prefill: running streams while a long prompt arrives (`moemesh bench chunked`)", "",
             f"Command: `{command}`  ", f"Machine: {machine()}, one thread  ",
             f"Load: model {model_name}, in-process engine; 4 streams decoding 120 tokens each, a {long_len}-token "
             "prompt joining at step 20; gaps between the running streams' tokens after it joined.", "",
             "| chunked prefill | token budget per step | TPOT p50 ms | TPOT p99 ms | longest gap ms | long prompt "
             "TTFT ms |", "|---|---|---|---|---|---|"]
    lines += [r.row() for r in results]
    lines += ["", f"Same tokens in every setting: {'yes' if same else 'NO'}."]
    text = "\n".join(lines) + "\n"
    if write:
        write_section(write, text)
    if not same:
        raise RuntimeError("chunked prefill changed the tokens: " + text)
    return text
