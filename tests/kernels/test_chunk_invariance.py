"""Chunked, token-by-token, batched and whole-prompt prefill give the same greedy tokens and the same CSA indexer
selections (the discrete choice a chunking could change: `Indexer.select` breaks exact score ties toward the lower
entry index, whatever the pool size when a query runs). Tiny model, float32, CPU."""

from __future__ import annotations

import pytest
import torch

import moemesh
from moemesh.kernels.compressor import Indexer

NEW_TOKENS = 4
LENGTHS = [1, 2, 3, 4, 5, 8, 13, 16, 17, 31, 33, 64, 65, 100, 127, 128, 129, 160, 200, 241, 256, 257, 300]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def selections(monkeypatch):
    """Every indexer selection made: {(indexer id, sequence tag, position): selected entry ids}."""
    made, tag = {}, {"seq": None}
    select = Indexer.select

    def recording(self, x, q_residual, positions, state):
        visible = select(self, x, q_residual, positions, state)
        for p, row in zip(positions.tolist(), visible):
            made[(id(self), tag["seq"], p)] = tuple(row.nonzero().flatten().tolist())
        return visible

    monkeypatch.setattr(Indexer, "select", recording)
    return made, tag


def _prompt(n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def _greedy(model, prompt: list[int], chunks: list[int] | None) -> list[int]:
    """Prefill `prompt` in chunks of the given sizes (cycled; None = whole), then decode NEW_TOKENS greedily."""
    cache, at, i = model.new_cache(), 0, 0
    while at < len(prompt):
        k = len(prompt) if chunks is None else chunks[i % len(chunks)]
        hidden = model.step([prompt[at:at + k]], [cache])
        at, i = at + k, i + 1
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(model.logits(hidden[-1:]).argmax()))
        hidden = model.step([[out[-1]]], [cache])
    return out


@pytest.mark.parametrize("chunks", [[1], [7], [16, 5, 64], [64]], ids=["by_token", "7", "16-5-64", "64"])
def test_chunked_prefill_equals_whole(tiny, selections, chunks):
    made, tag = selections
    for n in LENGTHS:
        prompt = _prompt(n, tiny.config.vocab_size)
        tag["seq"] = "whole"
        want = _greedy(tiny, prompt, None)
        tag["seq"] = "chunked"
        assert _greedy(tiny, prompt, chunks) == want, f"{n} tokens"
        whole = {k[::2]: v for k, v in made.items() if k[1] == "whole"}
        chunked = {k[::2]: v for k, v in made.items() if k[1] == "chunked"}
        assert chunked == whole, f"{n} tokens: indexer selections differ"
        made.clear()


def test_batched_prefill_equals_alone(tiny):
    """One step prefilling many prompts (and a mid-sequence chunk) picks the tokens each prompt gets alone."""
    prompts = [_prompt(n, tiny.config.vocab_size) for n in LENGTHS]
    alone = [_greedy(tiny, p, None) for p in prompts]
    caches = [tiny.new_cache() for _ in prompts]
    tiny.step([p[: len(p) // 2] for p in prompts if len(p) > 1], [c for p, c in zip(prompts, caches) if len(p) > 1])
    rest = [p[len(p) // 2:] if len(p) > 1 else p for p in prompts]
    hidden = tiny.step(rest, caches)
    ends = torch.tensor([len(r) for r in rest]).cumsum(0) - 1
    first = tiny.logits(hidden[ends]).argmax(-1).tolist()
    assert first == [a[0] for a in alone]
