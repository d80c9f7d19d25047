"""OpenAI wire types: body parsing, strict validation with errors that name the field and quote the value, limits,
unsupported options, the exception -> HTTP error map, response shapes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from moemesh.actors.ingress.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    IngressLimits,
    OpenAIError,
    WorkerError,
    inline_schema,
    parse_json_body,
    to_openai_error,
)

LIMITS = IngressLimits()


def completion(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **kw})


def error_of(fn) -> OpenAIError:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is what any exception maps to
        return to_openai_error(e)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("prompt,expected", [
    ("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompt == expected


@pytest.mark.parametrize("prompt", [[], [[]], [True, 1], [1.0], [[1], "a"], {"a": 1}, None, [-1]])
def test_bad_prompts(prompt):
    err = error_of(lambda: completion(prompt=prompt))
    assert (err.status, err.param, err.code) == (400, "prompt", "invalid_value")


def test_strict_types_and_messages_quote_the_value():
    err = error_of(lambda: completion(max_tokens="16"))
    assert err.param == "max_tokens" and err.message == 'max_tokens: Input should be a valid integer, got "16"'
    err = error_of(lambda: completion(temperature=-1))
    assert err.message == "temperature: Input should be greater than or equal to 0, got -1"
    assert error_of(lambda: CompletionRequest.model_validate({"prompt": "x"})).code == "missing_field"
    assert completion(temperature=1).temperature == 1.0  # JSON has one number type: ints are fine for floats


def test_unknown_fields_are_ignored():
    req = completion(user="u", metadata={"a": 1}, store=False, stream_options=None)
    assert not hasattr(req, "metadata") and not req.include_usage


def test_stop_normalization_and_limits():
    assert completion(stop="x").stop == ["x"] and completion(stop=None).stop == []
    for kw, param in [({"stop": ["a"] * 5}, "stop"), ({"stop": ["x" * 300]}, "stop"), ({"stop": [""]}, "stop"),
                      ({"n": 9}, "n"), ({"max_tokens": 5000}, "max_tokens"), ({"prompt": ["a"] * 17}, "prompt"),
                      ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
                      ({"stream_options": {"include_usage": True}}, "stream_options")]:
        err = error_of(lambda kw=kw: completion(**kw).check(LIMITS))
        assert (err.status, err.param) == (400, param), kw
    completion(stop=["a"] * 4, n=8, max_tokens=4096).check(LIMITS)
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize("kw,param", [({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of")])
def test_unsupported_completion_options(kw, param):
    err = error_of(lambda kw=kw: completion(**kw).check(LIMITS))
    assert (err.status, err.param, err.code) == (400, param, "unsupported_parameter")
    completion(best_of=1, logprobs=None, presence_penalty=0, logit_bias={}).check(LIMITS)  # defaults are fine


def test_logprobs_penalties_and_bias_are_accepted():
    req = completion(logprobs=20, echo=True, max_tokens=0, presence_penalty=-2, frequency_penalty=2,
                     repetition_penalty=1.3, logit_bias={"1": 100, "42": -100.0})
    req.check(LIMITS)
    assert req.bias() == {1: 100.0, 42: -100.0}
    for kw, param in [({"logit_bias": {"1.5": 1}}, "logit_bias"), ({"logit_bias": {"": 1}}, "logit_bias"),
                      ({"logit_bias": {"٣": 1}}, "logit_bias"), ({"max_tokens": 0}, "max_tokens")]:
        err = error_of(lambda kw=kw: completion(**kw).check(LIMITS))
        assert (err.status, err.param) == (400, param), kw


def test_chat_request():
    req = ChatCompletionRequest.model_validate({"model": "m", "max_tokens": 5, "max_completion_tokens": 7, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}, {"role": "tool", "content": "t", "tool_call_id": "1"}]})
    assert [m.content for m in req.messages] == ["a\nb", "", "t"] and req.max_tokens == 7
    assert error_of(lambda: ChatCompletionRequest(model="m", messages=[]).check(LIMITS)).param == "messages"
    err = error_of(lambda: ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}))
    assert err.param == "messages[0].content" and "input_audio" in err.message
    err = error_of(lambda: ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "tool_calls": [{"function": {"name": "f"}}]}]}))
    assert err.param == "messages[0]" and "only assistant messages" in err.message
    ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user"}], "tools": [],
                                          "response_format": {"type": "text"}, "logprobs": True,
                                          "top_logprobs": 20}).check(LIMITS)


@pytest.mark.parametrize("body,code", [(b"{", "invalid_json"), (b"[]", "invalid_json"), (b'"x"', "invalid_json"),
                                       (b'{"a": Infinity}', "invalid_json"), (b'{"a": "\xc3\x28"}', "invalid_encoding"),
                                       (b'{"a": "\\udfff x"}', "invalid_encoding"),
                                       ('{"a": 1}'.encode("utf-16"), "invalid_encoding"),
                                       (b"[" * 100_000, "invalid_json")])
def test_parse_json_body_rejects(body, code):
    err = error_of(lambda: parse_json_body(body))
    assert (err.status, err.code) == (400, code)


def test_parse_json_body_accepts_unicode():
    assert parse_json_body('{"p": "héllo \\ud83d\\ude00 😀"}'.encode()) == {"p": "héllo 😀 😀"}


def test_error_map():
    assert to_openai_error(OpenAIError(404, "m", code="c")).status == 404
    worker_value = WorkerError("x")
    worker_value.__cause__ = ValueError("prompt too long for the KV cache")
    assert (to_openai_error(worker_value).status, to_openai_error(worker_value).type) == (400, "invalid_request_error")
    timeout = WorkerError("slow")
    timeout.__cause__ = TimeoutError()
    assert (to_openai_error(timeout).status, to_openai_error(timeout).code) == (503, "worker_timeout")
    assert to_openai_error(WorkerError("x")).status == 503
    bug = to_openai_error(KeyError("x"))
    assert (bug.status, bug.type, bug.message) == (500, "internal_error", "internal error: KeyError")
    assert OpenAIError(400, "m", param="p", code="c").body() == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c"}}


def test_limits_config():
    with pytest.raises(ValidationError, match="extra"):
        IngressLimits(max_body=1)
    with pytest.raises(ValidationError, match="max_n"):
        IngressLimits(max_n=0)
    assert IngressLimits(max_n=32).max_n == 32


def test_inline_schema_has_no_refs():
    schema = inline_schema(ChatCompletionRequest)
    assert "$ref" not in json.dumps(schema) and schema["properties"]["messages"]["items"]["properties"]["role"]
    assert "anyOf" in inline_schema(CompletionRequest)["properties"]["prompt"]
