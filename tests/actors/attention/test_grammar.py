"""Structured output on the engine: greedy constrained output on `tiny` parses and validates against its schema
(jsonschema, an independent validator), the mask of one constrained request leaves the other rows of the batch as
they were, and a moved request's grammar resumes from the tokens it already generated. Forced tool calls: the grammar
accepts exactly the call markup around valid arguments, and the random model's forced call validates."""

from __future__ import annotations

import json

import jsonschema
import pytest

import moemesh
from moemesh.actors.attention.engine import Engine
from moemesh.actors.attention.grammar import GrammarCompiler, grammar_for
from moemesh.actors.request import RequestParams, StructuredOutput, ToolSpec
from moemesh.kernels.chat_format import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                    "maxItems": 3},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "pets", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def compiler(tiny_model_dir, model) -> GrammarCompiler:
    return grammar_for(tiny_model_dir, model.config)


def run(engine: Engine, requests: dict[str, tuple[list[int], RequestParams]]) -> dict[str, tuple[list[int], str]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out = {rid: ([], None) for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] = (out[o.request_id][0] + o.new_token_ids, o.finish_reason)
    return out


def text(compiler: GrammarCompiler, ids: list[int]) -> str:
    return compiler.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("prompt", ["Hello", "The expert mesh serves", "{"])
def test_greedy_output_validates(model, compiler, prompt):
    spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(SCHEMA))
    (out, finish), = run(Engine(model, grammar=compiler), {"r": (compiler.tokenizer.encode(prompt),
                                                                 RequestParams(max_tokens=300, structured=spec))}).values()
    assert finish == "stop" and out[-1] == model.config.eos_token_id
    jsonschema.validate(json.loads(text(compiler, out)), SCHEMA)


def test_json_object(model, compiler):
    """Any object: a random model may keep an open string going until `length` cuts it (as OpenAI documents), so
    each answer must be a prefix the grammar accepts, and the finished ones objects."""
    spec = StructuredOutput(kind="json_object")
    prompts = {f"r{i}": (compiler.tokenizer.encode(p), RequestParams(max_tokens=60, structured=spec))
               for i, p in enumerate(["Hello", "Hello there", "{", "The expert mesh serves", "a", "b", "c", "d"])}
    finished = 0
    for out, finish in run(Engine(model, grammar=compiler), prompts).values():
        assert compiler.state(spec).matcher.accept_string(text(compiler, out))
        if finish == "stop":
            finished += 1
            assert isinstance(json.loads(text(compiler, out)), dict)
    assert finished >= 1


def test_sampled_output_validates(model, compiler):
    spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(SCHEMA))
    for seed in range(3):
        params = RequestParams(max_tokens=300, temperature=1.0, seed=seed, structured=spec)
        (out, finish), = run(Engine(model, grammar=compiler), {"r": ([0, 40, 41], params)}).values()
        assert finish == "stop"
        jsonschema.validate(json.loads(text(compiler, out)), SCHEMA)


def test_constrained_row_leaves_the_batch_alone(model, compiler):
    prompts = [[0, 30 + i, 50 + i] for i in range(4)]
    plain = {f"p{i}": (p, RequestParams(max_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)}
    alone = run(Engine(model, grammar=compiler), plain)
    spec = StructuredOutput(kind="json_object")
    mixed = run(Engine(model, grammar=compiler), {**plain, "g": ([0, 40], RequestParams(max_tokens=40, structured=spec))})
    assert {rid: mixed[rid] for rid in plain} == alone


def test_moved_request_resumes_its_grammar(model, compiler):
    """A request re-admitted elsewhere arrives with its output so far as prompt (replay_chunks): the grammar catches
    up with those tokens, and the answer is the one the request would have given without the move."""
    spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(SCHEMA))
    prompt = [0, 40, 41]
    (whole, _), = run(Engine(model, grammar=compiler),
                      {"r": (prompt, RequestParams(max_tokens=300, structured=spec))}).values()
    k = 5
    params = RequestParams(max_tokens=300 - k, structured=spec, replay_chunks=[len(prompt)] + [1] * k)
    (rest, _), = run(Engine(model, grammar=compiler), {"r": (prompt + whole[:k], params)}).values()
    assert whole[:k] + rest == whole


def test_bad_grammar_is_refused_before_queueing(model, compiler):
    engine = Engine(model, grammar=compiler)
    bad = StructuredOutput(kind="json_schema", json_schema='{"type": "object", "minProperties": 3}')
    with pytest.raises(ValueError, match="response_format"):
        engine.add_request("r", [0, 1], RequestParams(structured=bad))
    with pytest.raises(ValueError, match="grammar compiler"):
        Engine(model).add_request("r", [0, 1], RequestParams(structured=StructuredOutput(kind="json_object")))
    assert not engine.has_unfinished()


TOOLS = (ToolSpec(name="lookup", parameters=json.dumps(SCHEMA)),
         ToolSpec(name="ping", parameters='{"type": "object", "properties": {}}'))


def call(name: str, args: str) -> str:
    return CALL_BEGIN + name + TOOL_SEP + args + CALL_END


def accepts(compiler: GrammarCompiler, spec: StructuredOutput, text: str) -> bool:
    """Does the grammar accept all of `text` and then end (eos)?"""
    matcher = compiler.state(spec).matcher
    ids = compiler.tokenizer.encode(text, add_special_tokens=False)
    eos = compiler.tokenizer.eos_token_id
    return all(matcher.accept_token(t) for t in ids) and matcher.accept_token(eos) and matcher.is_terminated()


def test_tool_calls_grammar_accepts_exactly_the_markup(compiler):
    one, many = (StructuredOutput(kind="tool_calls", tools=TOOLS, parallel=p) for p in (False, True))
    good = call("lookup", '{"name": "Ann", "age": 3, "pets": ["cat"], "ok": true}')
    assert accepts(compiler, one, CALLS_BEGIN + good + CALLS_END)
    assert accepts(compiler, many, CALLS_BEGIN + good + call("ping", "{}") + CALLS_END)
    assert not accepts(compiler, one, CALLS_BEGIN + good + call("ping", "{}") + CALLS_END)  # one call only
    assert not accepts(compiler, many, CALLS_BEGIN + call("pong", "{}") + CALLS_END)  # not a tool
    assert not accepts(compiler, many, CALLS_BEGIN + call("lookup", '{"name": "Ann"}') + CALLS_END)  # required
    assert not accepts(compiler, many, CALLS_BEGIN + CALLS_END)  # at least one call
    assert not accepts(compiler, many, "Sure. " + CALLS_BEGIN + good + CALLS_END)  # nothing before the calls


@pytest.mark.parametrize("prompt", ["Hello", "Call a tool"])
def test_greedy_tool_call_validates(model, compiler, prompt):
    """The random model, forced: one call to a known tool whose arguments validate, then eos."""
    spec = StructuredOutput(kind="tool_calls", tools=TOOLS, parallel=False)
    (out, finish), = run(Engine(model, grammar=compiler), {"r": (compiler.tokenizer.encode(prompt),
                                                                 RequestParams(max_tokens=300, structured=spec))}).values()
    assert finish == "stop" and out[-1] == model.config.eos_token_id
    body = text(compiler, out[:-1])
    assert body.startswith(CALLS_BEGIN + CALL_BEGIN) and body.endswith(CALL_END + CALLS_END)
    name, args = body[len(CALLS_BEGIN + CALL_BEGIN):-len(CALL_END + CALLS_END)].split(TOOL_SEP)
    schema = {t.name: json.loads(t.parameters) for t in TOOLS}[name]
    jsonschema.validate(json.loads(args), schema)
