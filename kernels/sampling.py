"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded; and the batched logits adjustments that
come before it (`apply_logit_bias`, `apply_penalties`, with vLLM's semantics) and logprobs (`top_logprobs`).

Shapes: n = rows (sequences) in the batch, V = vocabulary, k = logprobs asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (as vLLM), so logits / temperature stays finite
_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None or self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [n, V] -> token ids [n]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = (logits.float() / params.temperature).clamp(max=_MAX)  # a huge logit stays finite: softmax has no NaN
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int, device=None) -> torch.Tensor:
    """How often each token occurs in each row's list -> counts [n, V] (float32), built on `device` (only the ids
    travel there, not the [n, V] counts)."""
    longest = max((len(t) for t in token_ids), default=0)
    padded = torch.full((len(token_ids), longest), vocab_size, dtype=torch.long)  # pad = one extra column, dropped
    for i, ids in enumerate(token_ids):
        padded[i, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.float32, device=padded.device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits [n, V] += bias at (rows[i], ids[i]) for each i (rows, ids, bias [m]), in place; returns logits."""
    return logits.index_put_((rows, ids), bias.to(logits.dtype), accumulate=True)


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor | None, output_counts: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties, in its order, on logits [n, V] (out of place):

    1. repetition [n] on every token seen in the prompt (`prompt_mask` [n, V] bool; None: no row has one) or the
       output: a positive logit is divided by it, a negative one multiplied;
    2. frequency [n] times the token's count in the output (`output_counts` [n, V]) is subtracted;
    3. presence [n] is subtracted once from every token that occurs in the output.
    Logits stay finite (a tiny repetition penalty must not make +inf: softmax would give NaN)."""
    in_output = output_counts > 0  # [n, V]
    seen = in_output if prompt_mask is None else in_output | prompt_mask
    rep = repetition[:, None]  # [n, 1]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits).clamp(max=_MAX)
    return logits - frequency[:, None] * output_counts - presence[:, None] * in_output


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of logprobs [n, V] -> (values [n, k], token ids [n, k]), largest first."""
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    return values, ids
