"""Tool calls end to end: the official `openai` client against a real uvicorn server running the ingress over the
in-process engine (with its grammar compiler) on `tiny`. The tiny model's weights are random: with tool_choice
"required" or a named function it still answers with valid calls because the grammar forces the markup and the
arguments (checked with jsonschema against each function's parameters). And the 400s of actors/ingress/tools.py."""

from __future__ import annotations

import json

import jsonschema
import pytest

from moemesh.actors.ingress.protocol import ChatCompletionRequest, OpenAIError
from moemesh.actors.ingress.tools import tool_plan

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": -999, "maximum": 999}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def api(tiny_openai):
    return tiny_openai


def _check_calls(calls, names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_gives_a_valid_call(api, seed):
    r = api.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=400,
                                    temperature=1.0, seed=seed, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)


def test_required_parallel_calls_are_valid(api):
    """With parallel calls the random model may go on calling until max_tokens cuts it: every call it finished
    validates; a cut answer ends "length" with its last call's arguments as far as they got."""
    finished = 0
    for seed in range(4):
        r = api.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                        max_tokens=400, temperature=1.0, seed=seed)
        choice = r.choices[0]
        calls = choice.message.tool_calls
        assert choice.message.content is None and choice.finish_reason in ("tool_calls", "length")
        assert calls
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        if complete:
            _check_calls(complete)
        assert len({c.id for c in calls}) == len(calls)
        finished += choice.finish_reason == "tool_calls" and len(calls) >= 1
    assert finished >= 1


def test_named_function_and_no_parallel_calls(api):
    for seed in range(3):
        r = api.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=400, temperature=1.0,
                                        seed=seed, tool_choice={"type": "function", "function": {"name": "add"}},
                                        parallel_tool_calls=False)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "add"
        _check_calls(calls)


def test_streamed_calls_arrive_as_openai_deltas(api):
    """Greedy: the streamed deltas rebuild the same calls as the whole answer; each call's first delta has its id and
    name (empty arguments), later ones only argument fragments; no content is streamed."""
    # one call (the grammar then ends the answer after it): with parallel calls the random model may go on calling
    # until max_tokens, and whether it does shifts with the last bits of the step's arithmetic
    kwargs = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=400, temperature=0,
                  parallel_tool_calls=False)
    whole = api.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls, finish, fragments = {}, None, 0
    for chunk in api.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content
        for d in delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
                fragments += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and fragments >= 1
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_auto_and_none_and_a_conversation_with_earlier_calls(api):
    """auto on a random model: whatever it writes, no markup reaches content. none: the tools are not shown (the
    prompt is the one without tools). Earlier calls and tool results are rendered into the prompt."""
    plain = api.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    none = api.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    auto = api.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=30, temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert "｜tool" not in (auto.choices[0].message.content or "")
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("kwargs,param,words", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", ["'nope'"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objectt"}}}]), "tools",
     ["tools[0].function.parameters", "not a valid JSON schema"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "multipleOf": 3}}}],
          tool_choice="required"), "tools", ["multipleOf"]),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools", ["more than once"]),
    (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools", ["tools[0].function.name"]),
    (dict(tool_choice="required"), "tool_choice", ["needs tools"]),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice", ["'always'"]),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
     ["response_format"]),
])
def test_bad_tools_get_400_naming_the_field(api, kwargs, param, words):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, **kwargs)
    assert e.value.body["param"] == param
    assert all(w in e.value.body["message"] for w in words), e.value.body["message"]


def test_plan():
    def plan(**kw):
        return tool_plan(ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **kw}))

    assert plan().names == frozenset() and plan(tools=TOOLS, tool_choice="none").tools is None
    auto = plan(tools=TOOLS)
    assert auto.names == {"get_weather", "add"} and auto.structured is None and auto.max_calls is None
    # auto: the schema is only shown, so keywords the grammar would not enforce are fine
    plan(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "multipleOf": 3}}}])
    named = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                 parallel_tool_calls=False)
    assert named.max_calls == 1 and named.structured.kind == "tool_calls" and not named.structured.parallel
    assert [t.name for t in named.structured.tools] == ["add"] and json.loads(named.structured.tools[0].parameters) \
        == ADD
    assert [t.name for t in plan(tools=TOOLS, tool_choice="required").structured.tools] == ["get_weather", "add"]
    no_params = plan(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")
    assert json.loads(no_params.structured.tools[0].parameters) == {"type": "object", "properties": {}}
    for bad in ([{"type": "function", "function": "f"}], [{"function": {"name": "f"}}],
                [{"type": "function", "function": {"name": "f", "description": 3}}],
                [{"type": "function", "function": {"name": "f", "parameters": [1]}}]):
        with pytest.raises(OpenAIError) as e:
            plan(tools=bad)
        assert e.value.status == 400 and e.value.param == "tools"


def test_each_choice_parses_its_own_calls(api):
    """n=2, streamed: the chunks of two choices interleave; each choice's deltas rebuild its own valid call."""
    calls: dict[int, dict[int, list]] = {0: {}, 1: {}}
    finish = {}
    for chunk in api.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", n=2,
                                             parallel_tool_calls=False, max_tokens=400, temperature=1.0, seed=5,
                                             stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            for d in choice.delta.tool_calls or []:
                call = calls[choice.index].setdefault(d.index, [d.function.name, ""])
                call[1] += d.function.arguments or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for index in (0, 1):
        (name, arguments), = calls[index].values()
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
