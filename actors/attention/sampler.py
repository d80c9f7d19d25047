"""The sampler of an attention worker's step: the logits of the sequences that reached their end -> their next
tokens, with logit_bias, penalties, per-request logits processors and logprobs applied over the step's rows as a
batch; and prompt logprobs (`echo` with logprobs, lm-evaluation-harness's loglikelihood) from prefill rows.

The order is vLLM v1's: logit_bias -> penalties (repetition, frequency, presence) -> logits processors (a grammar's
mask slots in here) -> logprobs -> temperature, top-k, top-p and the draw (or argmax). The logprobs returned are the
log-softmax of the logits after bias, penalties and processors, before temperature and truncation: the distribution
the request's parameters define, whose top entry greedy picks (docs/api.md, "Logprobs"). Rows without penalties,
bias, processors or logprobs pay for none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moemesh.actors.attention.grammar import GrammarState, apply_grammars
from moemesh.actors.request import RequestParams, TokenLogprobs
from moemesh.kernels.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    sample,
    token_counts,
    top_logprobs,
)

LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]
"""A per-request hook: (output token ids so far, logits [V]) -> logits [V], e.g. a grammar's mask (-inf) of the tokens
it does not allow next. It runs after penalties and before logprobs and sampling, so both see it."""


@dataclass
class SampleRow:
    """One sequence to sample in this step."""

    params: RequestParams
    sampling: SamplingParams
    generator: torch.Generator | None
    prompt_ids: Sequence[int]  # what repetition_penalty counts besides the output
    output_ids: Sequence[int]  # the tokens generated so far (all penalties count them)
    processors: Sequence[LogitsProcessor] = ()
    grammar: GrammarState | None = None  # structured output: its mask applies with the batch's others in one op
    stop_ids: Sequence[int] = ()  # what may follow a finished grammar


@dataclass
class Sampled:
    token: int
    logprobs: TokenLogprobs | None  # one entry, of `token`; None when the request did not ask


@torch.inference_mode()
def sample_rows(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[Sampled]:
    """logits [n, V] (float32, one row per entry of `rows`; changed in place) -> one `Sampled` per row."""
    logits = adjust_logits(logits, rows)
    tokens = draw(logits, rows)  # [n]
    lps = logprobs_of(logits, tokens, [r.params.logprobs for r in rows])
    return [Sampled(int(t), lp) for t, lp in zip(tokens.tolist(), lps)]


def adjust_logits(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Steps 1-3: logit_bias, penalties, grammar masks and logits processors, each on the rows that have them."""
    # Step 1: logit_bias, one scatter over the batch
    biased = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
    if biased:
        i, t, b = (torch.tensor(x, device=logits.device) for x in zip(*biased))
        apply_logit_bias(logits, i, t, b.float())
    # Step 2: penalties, on the sub-batch of rows that set one
    pen = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
    if pen:
        sub = [rows[i] for i in pen]
        V, dev = logits.shape[-1], logits.device
        per_row = [[r.params.presence_penalty, r.params.frequency_penalty, r.params.repetition_penalty] for r in sub]
        presence, frequency, repetition = torch.tensor(per_row, device=dev).T  # [m] each
        prompt_mask = None
        if any(r.params.repetition_penalty != 1 for r in sub):
            prompt_mask = token_counts([r.prompt_ids for r in sub], V, dev) > 0  # [m, V]
        index = torch.tensor(pen, device=dev)
        logits[index] = apply_penalties(logits[index], prompt_mask, token_counts([r.output_ids for r in sub], V, dev),
                                        presence, frequency, repetition)
    # Step 3: grammar masks (one bitmask over the batch), then per-request logits processors
    constrained = [(i, r.grammar, r.output_ids) for i, r in enumerate(rows) if r.grammar is not None]
    if constrained:
        apply_grammars(logits, constrained, rows[constrained[0][0]].stop_ids)
    for i, r in enumerate(rows):
        for processor in r.processors:
            logits[i] = processor(r.output_ids, logits[i])
    return logits


def _has_penalty(p: RequestParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1)


def draw(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Step 5: argmax for the greedy rows (one call), each other row with its own parameters and generator -> [n]."""
    tokens = logits.argmax(dim=-1)
    for i, r in enumerate(rows):
        if not r.sampling.greedy:
            tokens[i] = sample(logits[i:i + 1], r.sampling, r.generator)[0]
    return tokens


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """Step 4: for the rows whose k is not None, the logprob of `tokens` [n] and the k most likely tokens, from one
    log_softmax and one topk over those rows."""
    want = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(ks)
    if not want:
        return out
    index = torch.tensor(want, device=logits.device)
    lp = torch.log_softmax(logits[index], dim=-1)  # [m, V]
    own = lp.gather(1, tokens[index][:, None])[:, 0].tolist()
    k = max(ks[i] for i in want)
    values, ids = top_logprobs(lp, k) if k else (lp[:, :0], lp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    for j, i in enumerate(want):
        out[i] = TokenLogprobs([own[j]], [ids[j][:ks[i]]], [values[j][:ks[i]]])
    return out


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, next_ids: Sequence[int], k: int) -> TokenLogprobs:
    """logits [T, V] of T prompt positions, next_ids [T] the prompt token after each -> the logprob of each next token
    and the k most likely tokens there (the raw model's: no penalty applies to a prompt)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    own = lp.gather(1, torch.tensor(list(next_ids), device=lp.device)[:, None])[:, 0].tolist()
    values, ids = top_logprobs(lp, k) if k else (lp[:, :0], lp[:, :0].long())
    return TokenLogprobs(own, ids.tolist(), values.tolist())
