"""Prefix caching under a shared-prefix multi-turn workload (`moemesh bench prefix`): TTFT with the cache on and off.

`conversations` chats share one system prompt of `system_len` tokens; each has `turns` turns, and turn t's prompt is
the conversation so far (system prompt, earlier user messages and answers) plus a new user message of `user_len`
tokens. Turns run one at a time in the in-process engine (round-robin over the conversations, so later conversations
find the system prompt cached and later turns find their own history), so TTFT is the prefill of that prompt alone
(minus what the cache held) plus the first decode. The same workload runs on a fresh engine with
`enable_prefix_caching` off and on; both must give the same tokens (greedy).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from moemesh.actors.attention.engine import CacheConfig, Engine
from moemesh.actors.request import RequestParams


@dataclass
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    tokens: list[int]


@dataclass(frozen=True)
class Workload:
    conversations: int = 4
    turns: int = 4
    system_len: int = 512
    user_len: int = 32
    max_tokens: int = 16
    seed: int = 0

    def texts(self, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
        """(system prompt, user messages [conversation][turn]) as random token ids (no special tokens)."""
        g = torch.Generator().manual_seed(self.seed)
        system = torch.randint(3, vocab, (self.system_len,), generator=g).tolist()
        users = [[torch.randint(3, vocab, (self.user_len,), generator=g).tolist() for _ in range(self.turns)]
                 for _ in range(self.conversations)]
        return system, users


def run_turn(engine: Engine, request_id: str, prompt: list[int], params: RequestParams) -> tuple[float, list[int], int]:
    """One request alone in `engine` -> (TTFT seconds, its tokens, prompt tokens found cached)."""
    start, first, tokens, cached = time.perf_counter(), None, [], 0
    engine.add_request(request_id, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and out.new_token_ids:
                first = time.perf_counter() - start
            tokens += out.new_token_ids
            cached = out.cached_tokens
    return first, tokens, cached


def run_workload(engine: Engine, work: Workload) -> list[Turn]:
    system, users = work.texts(engine.model.config.vocab_size)
    params = RequestParams(max_tokens=work.max_tokens, ignore_eos=True)
    history = [list(system) for _ in range(work.conversations)]
    out = []
    for t in range(work.turns):
        for c in range(work.conversations):
            prompt = history[c] + users[c][t]
            ttft, tokens, cached = run_turn(engine, f"c{c}-t{t}", prompt, params)
            out.append(Turn(c, t, len(prompt), cached, ttft, tokens))
            history[c] = prompt + tokens
    return out


def measure(model, work: Workload, repeats: int = 2) -> dict[bool, list[Turn]]:
    """cache on/off -> the turns of its fastest run (by summed TTFT) of `repeats` fresh engines each, alternated,
    after a warm-up run (first calls of the model's kernels)."""
    best: dict[bool, list[Turn]] = {}
    run_workload(Engine(model), Workload(conversations=1, turns=2, system_len=work.system_len,
                                         user_len=work.user_len, max_tokens=2, seed=work.seed + 1))  # warm-up
    for _ in range(repeats):
        for on in (False, True):
            engine = Engine(model, cache=CacheConfig(enable_prefix_caching=on))
            turns = run_workload(engine, work)
            if on not in best or sum(x.ttft_s for x in turns) < sum(x.ttft_s for x in best[on]):
                best[on] = turns
    return best


def _ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):.1f}" if values else "-"


def markdown(best: dict[bool, list[Turn]], work: Workload, name: str, device: str, machine: str,
             command: str) -> str:
    same = [a.tokens for a in best[False]] == [b.tokens for b in best[True]]
    rows = []
    for on in (False, True):
        turns = best[on]
        first = [x.ttft_s for x in turns if x.conversation == 0 and x.turn == 0]
        shared = [x.ttft_s for x in turns if x.conversation > 0 and x.turn == 0]
        later = [x.ttft_s for x in turns if x.turn > 0]
        prompt, cached = sum(x.prompt_tokens for x in turns), sum(x.cached_tokens for x in turns)
        rows.append(f"| {'on' if on else 'off'} | {_ms(first)} | {_ms(shared)} | {_ms(later)} | "
                    f"{_ms([x.ttft_s for x in turns])} | {cached}/{prompt} ({100 * cached / prompt:.0f}%) |")
    off = statistics.mean(x.ttft_s for x in best[False] if x.turn > 0 or x.conversation > 0)
    on = statistics.mean(x.ttft_s for x in best[True] if x.turn > 0 or x.conversation > 0)
    return "\n".join([
        "## Prefix caching (`moemesh bench prefix`)", "",
        f"Command: `{command}`. Machine: {machine}; device {device}. Model {name}, in-process engine, greedy, one "
        f"request at a time. Workload: {work.conversations} conversations sharing a {work.system_len}-token system "
        f"prompt, {work.turns} turns each (a {work.user_len}-token user message, a {work.max_tokens}-token answer; "
        f"each turn's prompt is the conversation so far), run round-robin. TTFT medians in ms, best of 2 runs on "
        "fresh engines; `cached` = prompt tokens whose state came from the prefix cache.", "",
        "| prefix cache | TTFT first request | TTFT turn 1, system prompt shared | TTFT later turns | TTFT all | "
        "cached / prompt tokens |",
        "|---|---|---|---|---|---|", *rows, "",
        f"Mean TTFT of the requests that could hit (all but the very first): {1e3 * off:.1f} ms off, "
        f"{1e3 * on:.1f} ms on ({off / on:.2f}x). Same tokens with and without the cache: {'yes' if same else 'NO'}.",
        ""])


def run(model_name: str, work: Workload, device: str, write: str | None, command: str) -> str:
    """Measure on `model_name` (a built-in name or a checkpoint directory) -> the markdown section (also written to
    `write`'s section)."""
    from moemesh.cluster.bench.report import write_section
    from moemesh.cluster.bench.serve import machine
    from moemesh.cluster.serve.app import resolve_model
    from moemesh.kernels.device import resolve_device
    from moemesh.kernels.model import load_model

    dev = resolve_device(device)
    model = load_model(resolve_model(model_name), device=dev)
    need = work.system_len + work.turns * (work.user_len + work.max_tokens)
    if need > model.config.max_position_embeddings:
        raise ValueError(f"--prompt-len/--turns: the last turn needs {need} tokens, more than the model's context "
                         f"of {model.config.max_position_embeddings}")
    best = measure(model, work)
    where = f"{machine()} (load average {os.getloadavg()[0]:.1f} at the end: shared with other work)"
    text = markdown(best, work, model_name, str(dev), where, command)
    if write:
        write_section(write, text)
    return text
