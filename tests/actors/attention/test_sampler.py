"""The worker's sampler: penalties and logit_bias against float64 references written out token by token; logprobs
and prompt logprobs from the engine against the in-process model (`DeepseekV4.forward`, log_softmax in float64);
greedy with penalties against a reference decode loop; a request without penalties or logprobs is unchanged by
its batch neighbours; a per-request logits processor steers sampling; `Delta`s with logprobs survive `asdict`."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

import moemesh
from moemesh.actors.attention.engine import Engine
from moemesh.actors.attention.sampler import SampleRow, adjust_logits, sample_rows
from moemesh.actors.request import Delta, RequestParams, TokenLogprobs
from moemesh.kernels.sampling import SamplingParams

LOGPROB_ATOL = 2e-5  # engine (float32, paged cache, batched) vs the model run alone, log_softmax in float64 (measured
# on CPU: at most 2e-6)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


def reference_adjust(logits: list[float], prompt: list[int], output: list[int], p: RequestParams) -> list[float]:
    """vLLM's semantics, one token at a time in float64: bias, then repetition (prompt + output), frequency and
    presence (output only)."""
    out = [float(x) for x in logits]
    for t, b in p.logit_bias.items():
        out[t] += b
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


def _row(params: RequestParams, prompt, output) -> SampleRow:
    return SampleRow(params, params.sampling(), None, prompt, output)


@pytest.mark.parametrize("params", [
    RequestParams(presence_penalty=1.5),
    RequestParams(frequency_penalty=-0.7),
    RequestParams(repetition_penalty=1.3),
    RequestParams(repetition_penalty=0.6),
    RequestParams(logit_bias={3: 100.0, 9: -42.5}),
    RequestParams(presence_penalty=0.3, frequency_penalty=1.1, repetition_penalty=1.7, logit_bias={5: 2.0, 7: -1}),
])
def test_penalties_match_a_float64_reference(params):
    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(4, V, generator=g) * 3
    prompts = [[1, 2, 3, 3], [5], [7, 8, 9], [4, 4, 11]]
    outputs = [[3, 3, 10, 12, 12, 12], [], [9, 8], [1]]
    plain = RequestParams()
    rows = [_row(params if i % 2 == 0 else plain, p, o) for i, (p, o) in enumerate(zip(prompts, outputs))]
    got = adjust_logits(logits.clone(), rows)
    for i, r in enumerate(rows):
        want = reference_adjust(logits[i].tolist(), prompts[i], outputs[i], r.params)
        torch.testing.assert_close(got[i].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-5)
    assert torch.equal(got[1], logits[1]) and torch.equal(got[3], logits[3])  # rows without penalties: untouched


def test_logprobs_and_greedy_pick_the_top_entry():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(1))
    rows = [_row(RequestParams(logprobs=4), [1], []), _row(RequestParams(), [1], []),
            _row(RequestParams(logprobs=0, logit_bias={2: 50.0}), [1], [])]
    out = sample_rows(logits.clone(), rows)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out[1].logprobs is None
    assert out[0].token == int(ref[0].argmax()) == out[0].logprobs.top_ids[0][0]
    assert math.isclose(out[0].logprobs.logprobs[0], float(ref[0].max()), abs_tol=1e-6)
    assert out[0].logprobs.top_ids[0] == ref[0].topk(4).indices.tolist()
    assert out[2].token == 2 and out[2].logprobs.top_ids == [[]]  # logprobs after the bias
    biased = logits[2].double().clone()
    biased[2] += 50
    assert math.isclose(out[2].logprobs.logprobs[0], float(torch.log_softmax(biased, -1)[2]), abs_tol=1e-6)


def test_tiny_repetition_penalty_keeps_sampling_finite():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(2)).abs()
    params = RequestParams(repetition_penalty=1e-300, temperature=0.9, seed=3)
    out = sample_rows(logits, [SampleRow(params, params.sampling(), params.sampling().generator("cpu"), [1, 2], [])])
    assert out[0].token in (1, 2)  # both became huge (clamped, finite): one of them is drawn, never NaN


def test_logits_processor_steers_sampling():
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))

    def only_five(output, row):
        mask = torch.full_like(row, float("-inf"))
        mask[5] = 0
        return row + mask

    rows = [SampleRow(RequestParams(logprobs=2), SamplingParams(), None, [1], [], [only_five]), _row(RequestParams(),
                                                                                                    [1], [])]
    out = sample_rows(logits.clone(), rows)
    assert out[0].token == 5 and out[0].logprobs.logprobs == [0.0] and out[1].token == int(logits[1].argmax())


def test_delta_round_trips_through_asdict():
    d = Delta([4, 5], "stop", 3, 2, TokenLogprobs([-0.1, -2.0], [[4], [1]], [[-0.1], [-0.5]]),
              TokenLogprobs([-3.0], [[]], [[]]))
    assert Delta(**asdict(d)) == d


# ---- the engine against the in-process model ------------------------------------------------------------------
def _collect(engine: Engine, requests: dict[str, tuple[list[int], RequestParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got = {rid: {"tokens": [], "lp": TokenLogprobs(), "prompt": None} for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            g = got[out.request_id]
            g["tokens"] += out.new_token_ids
            if out.logprobs is not None:
                g["lp"] = g["lp"] + out.logprobs
            if out.prompt_logprobs is not None:
                assert g["prompt"] is None, "prompt logprobs come once"
                g["prompt"] = out.prompt_logprobs
    return got


def _reference_logprobs(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    """The model alone, fed as the engine feeds it (the prompt in one prefill, then one token per step: the CSA
    indexer's top-k may pick other, equally scored entries when the same tokens come in another chunking):
    log_softmax in float64 of the logits at every position, [T, V]; row p predicts token p + 1."""
    caches = [model.new_cache()]
    rows = [model.forward(torch.tensor([prompt]), caches=caches)[0]]
    rows += [model.forward(torch.tensor([[t]]), caches=caches)[0] for t in out]
    return torch.log_softmax(torch.cat(rows).double(), dim=-1)


def test_engine_logprobs_match_the_model(model):
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 7, 33, 200)]
    engine = Engine(model)
    reqs = {f"r{i}": (p, RequestParams(max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True))
            for i, p in enumerate(prompts)}
    reqs["plain"] = (prompts[1], RequestParams(max_tokens=6, ignore_eos=True))
    got = _collect(engine, reqs)
    for i, p in enumerate(prompts):
        g = got[f"r{i}"]
        ref = _reference_logprobs(model, p, g["tokens"])  # [T, V]
        n = len(p)
        assert len(g["prompt"]) == n - 1 and len(g["lp"]) == 6
        want_prompt = [float(ref[q, p[q + 1]]) for q in range(n - 1)]
        assert g["prompt"].logprobs == pytest.approx(want_prompt, abs=LOGPROB_ATOL)
        want = [float(ref[n - 1 + j, t]) for j, t in enumerate(g["tokens"])]
        assert g["lp"].logprobs == pytest.approx(want, abs=LOGPROB_ATOL)
        for j, t in enumerate(g["tokens"]):  # greedy: the token is the top entry; the top-3 are the model's
            assert g["lp"].top_ids[j][0] == t and g["lp"].top_ids[j] == ref[n - 1 + j].topk(3).indices.tolist()
            assert g["lp"].top_logprobs[j] == pytest.approx(ref[n - 1 + j].topk(3).values.tolist(), abs=LOGPROB_ATOL)
        for q in range(n - 1):
            assert g["prompt"].top_ids[q] == ref[q].topk(2).indices.tolist()
    assert got["plain"]["tokens"] == got["r1"]["tokens"] and got["plain"]["prompt"] is None
    assert len(got["plain"]["lp"]) == 0


def test_prompt_logprobs_survive_chunked_prefill_and_preemption(model):
    """Chunked prefill gives the same prompt logprobs as one prefill; a sequence preempted (recomputed from
    scratch) sends them once, unchanged, with its first token and later logprobs for every token."""
    from moemesh.actors.attention.engine import CacheConfig
    from moemesh.actors.attention.scheduler import SchedulerConfig

    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (45, 30, 20)]
    params = RequestParams(max_tokens=24, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    requests = {f"r{i}": (p, params) for i, p in enumerate(prompts)}
    whole = _collect(Engine(model), requests)
    chunked = _collect(Engine(model, scheduler=SchedulerConfig(max_num_batched_tokens=16, chunked_prefill=True)),
                       {"r0": requests["r0"]})
    assert chunked["r0"]["prompt"].logprobs == pytest.approx(whole["r0"]["prompt"].logprobs, abs=LOGPROB_ATOL)
    assert chunked["r0"]["prompt"].top_ids == whole["r0"]["prompt"].top_ids
    tight = Engine(model, cache=CacheConfig(block_size=4, num_blocks=30), scheduler=SchedulerConfig(max_num_seqs=3))
    preempted = _collect(tight, requests)
    assert tight.scheduler.num_preemptions > 0
    for rid, g in preempted.items():
        assert g["tokens"] == whole[rid]["tokens"] and len(g["lp"]) == 24
        assert g["lp"].logprobs == pytest.approx(whole[rid]["lp"].logprobs, abs=LOGPROB_ATOL)
        assert g["prompt"].logprobs == pytest.approx(whole[rid]["prompt"].logprobs, abs=LOGPROB_ATOL)


def test_greedy_with_penalties_matches_a_reference_decode(model):
    """Each step: the model's logits for the sequence so far (float64), adjusted by the reference, argmax."""
    prompt = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    params = RequestParams(max_tokens=8, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.4,
                           logit_bias={prompt[0]: 3.0}, ignore_eos=True, logprobs=1)
    got = _collect(Engine(model), {"p": (prompt, params), "q": (prompt, RequestParams(max_tokens=8, ignore_eos=True))})
    out: list[int] = []
    caches = [model.new_cache()]
    logits_last = model.forward(torch.tensor([prompt]), caches=caches)[0, -1]
    for _ in range(8):
        logits = logits_last.double().tolist()
        adjusted = torch.tensor(reference_adjust(logits, prompt, out, params))
        out.append(int(adjusted.argmax()))
        assert got["p"]["lp"].logprobs[len(out) - 1] == pytest.approx(
            float(torch.log_softmax(adjusted, -1)[out[-1]]), abs=LOGPROB_ATOL)
        logits_last = model.forward(torch.tensor([[out[-1]]]), caches=caches)[0, -1]
    assert got["p"]["tokens"] == out
    plain = model.generate(torch.tensor([prompt]), max_new_tokens=8, eos_token_id=None)[0, 12:].tolist()
    assert got["q"]["tokens"] == plain  # its neighbour's penalties do not touch it


def test_engine_refuses_a_bias_outside_the_vocabulary(model):
    with pytest.raises(ValueError, match="logit_bias"):
        Engine(model).add_request("x", [5], RequestParams(logit_bias={model.config.vocab_size: 1.0}))


def test_rows_without_penalties_pay_nothing_for_them(monkeypatch):
    import moemesh.actors.attention.sampler as sampler

    def refuse(*args, **kwargs):
        raise AssertionError("counted tokens for a batch without penalties")

    monkeypatch.setattr(sampler, "token_counts", refuse)
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    rows = [_row(RequestParams(logit_bias={1: 1.0}), [1, 2], [3]), _row(RequestParams(logprobs=1), [4], [5, 5])]
    assert len(sample_rows(logits, rows + [_row(RequestParams(), [1], [])])) == 3
