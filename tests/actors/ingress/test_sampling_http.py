"""Logprobs, penalties and logit_bias end to end: the official `openai` client, and lm-evaluation-harness's
`local-completions` model, against a real uvicorn server running the ingress over the in-process engine on `tiny`.
Logprobs are checked against the in-process model (`DeepseekV4.forward` on the same checkpoint, fed as the engine
feeds it, log_softmax in float64) to LOGPROB_ATOL; penalties against the engine run directly with the same
parameters (their arithmetic is checked against float64 in tests/actors/attention/test_sampler.py)."""

from __future__ import annotations

import math

import pytest
import torch

import moemesh
from moemesh.actors.attention.engine import AsyncEngine, Engine
from moemesh.actors.ingress.app import Ingress
from moemesh.actors.ingress.metrics import Metrics
from moemesh.actors.ingress.text import TextCodec
from moemesh.actors.request import RequestParams

pytestmark = pytest.mark.timeout(300)
LOGPROB_ATOL = 2e-5  # served (float32, paged KV cache, batched) vs the model alone in float64 (measured: 2e-6)
MODEL = "tiny"
CHAT = [{"role": "user", "content": "The expert mesh"}]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def codec(tiny_model_dir) -> TextCodec:
    return TextCodec.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def url(serve, tiny_model_dir, model, engine_worker) -> str:
    engine = AsyncEngine(Engine(model))
    ingress = Ingress.from_checkpoint(tiny_model_dir, [engine_worker(engine)], model_name=MODEL,
                                      metrics=Metrics(process_collectors=False))
    return serve(ingress.http_app)


@pytest.fixture(scope="module")
def api(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(model, prompt: list[int], out: list[int] = ()) -> torch.Tensor:
    """The model alone, the prompt in one prefill, then `out` one token per step (as the server feeds them; another
    chunking may let the CSA indexer pick other, equally scored entries): log_softmax in float64, [T, V]; row p
    predicts token p + 1."""
    caches = [model.new_cache()]
    rows = [model.forward(torch.tensor([prompt]), caches=caches)[0]]
    rows += [model.forward(torch.tensor([[t]]), caches=caches)[0] for t in out]
    return torch.log_softmax(torch.cat(rows).double(), dim=-1)


def greedy(model, ids: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=None)[0, len(ids):].tolist()


def test_chat_logprobs_match_the_model(api, model, codec):
    r = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                    top_logprobs=3, extra_body={"ignore_eos": True})
    prompt = codec.encode_chat(codec_messages(CHAT))
    out = greedy(model, prompt, 8)
    ref = reference(model, prompt, out)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for j, (entry, t) in enumerate(zip(content, out)):
        row = ref[len(prompt) - 1 + j]
        assert (entry.token, entry.bytes) == codec.token_piece(t)
        assert math.isclose(entry.logprob, float(row[t]), abs_tol=LOGPROB_ATOL)
        top = row.topk(3)
        assert [e.token for e in entry.top_logprobs] == [codec.token_piece(i)[0] for i in top.indices.tolist()]
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=LOGPROB_ATOL)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the top entry
    # the random model may end on a partial UTF-8 character: both sides show it as U+FFFD
    assert bytes(b for e in content for b in e.bytes).decode(errors="replace") == r.choices[0].message.content
    stream = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def codec_messages(messages):
    from moemesh.actors.ingress.protocol import ChatMessage

    return [ChatMessage(**m) for m in messages]


def test_echo_with_max_tokens_zero_gives_prompt_logprobs(api, model, codec):
    """lm-evaluation-harness's loglikelihood form: the prompt's own logprobs, the first token's null."""
    text = "Mixture of experts routes every token"
    r = api.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    ids = codec.encode(text)
    ref = reference(model, ids)
    choice = r.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [codec.token_piece(t)[0] for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(ref[p, ids[p + 1]]) for p in range(len(ids) - 1)],
                                                  abs=LOGPROB_ATOL)
    for p, top in enumerate(lp.top_logprobs[1:]):
        assert lp.tokens[p + 1] in top and 2 <= len(top) <= 3  # the top 2, and the token itself
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_streamed_completion_logprobs_with_echo(api, model, codec):
    text = "The expert"
    ids = codec.encode(text)
    chunks = list(api.completions.create(model=MODEL, prompt=text, max_tokens=5, echo=True, logprobs=1, stream=True,
                                         temperature=0, extra_body={"ignore_eos": True}))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    out = greedy(model, ids, 5)
    ref = reference(model, ids, out)
    assert tokens == [codec.token_piece(t)[0] for t in ids + out]
    assert values[0] is None
    assert values[1:] == pytest.approx([float(ref[p, (ids + out)[p + 1]]) for p in range(len(ids) + 4)],
                                       abs=LOGPROB_ATOL)
    assert "".join(c.choices[0].text for c in chunks) == text + codec.decode(out)


@pytest.mark.parametrize("fields", [{"presence_penalty": 1.5}, {"frequency_penalty": 1.2},
                                    {"repetition_penalty": 1.8}, {"frequency_penalty": -2.0, "presence_penalty": 2.0},
                                    {"logit_bias": {"200": 5.0, "201": -100}}])
def test_penalties_through_http_equal_the_engine(api, model, codec, fields):
    text = "The expert mesh routes every token to the expert"
    ids = codec.encode(text)
    extra = {k: v for k, v in fields.items() if k == "repetition_penalty"}
    kw = {k: v for k, v in fields.items() if k != "repetition_penalty"}
    r = api.completions.create(model=MODEL, prompt=text, max_tokens=20, temperature=0, **kw,
                               extra_body={"ignore_eos": True, **extra})
    params = RequestParams(max_tokens=20, ignore_eos=True, **{k: v for k, v in fields.items() if k != "logit_bias"},
                           logit_bias={int(k): v for k, v in fields.get("logit_bias", {}).items()})
    engine = Engine(model)
    engine.add_request("x", ids, params)
    tokens = [t for _ in range(20) for out in engine.step() for t in out.new_token_ids]
    assert r.choices[0].text == codec.decode(tokens)
    assert tokens != greedy(model, ids, 20)  # the penalty changed the answer


def test_logit_bias_forces_a_token(api, codec):
    r = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0.8, seed=1,
                                    logit_bias={"300": 100}, logprobs=True, extra_body={"ignore_eos": True})
    assert [e.token for e in r.choices[0].logprobs.content] == [codec.token_piece(300)[0]] * 4


def test_bad_values_get_400_naming_the_field(api):
    import openai

    for kw, param in [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                      ({"logit_bias": {"512": 1}}, "logit_bias"), ({"presence_penalty": 3}, "presence_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **kw)
        assert e.value.body["param"] == param


def test_lm_eval_loglikelihood_equals_the_model(url, model, tiny_model_dir):
    """lm-evaluation-harness's `local-completions` model (echo + logprobs, token-id prompts) against the server."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(model=MODEL, base_url=url + "/v1/completions", tokenizer=str(tiny_model_dir),
                             tokenizer_backend="huggingface", max_retries=1, num_concurrent=1, batch_size=2)
    pairs = [("The expert mesh", " routes every token"), ("Mixture of experts", " is sparse"),
             ("a", " b c d e f")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
        ctx, cont = lm._encode_pair(context, continuation)
        ref = reference(model, ctx + cont)
        want = sum(float(ref[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert math.isclose(logprob, want, abs_tol=LOGPROB_ATOL * len(cont)), (context, continuation)
        top = [int(ref[len(ctx) - 1 + j].argmax()) for j in range(len(cont))]
        assert is_greedy == (top == cont)
