"""Structured output end to end: the official `openai` client against a real uvicorn server running the ingress over
the in-process engine (with its grammar compiler) on `tiny`; answers validated with jsonschema. And the schema checks
of actors/ingress/structured.py: invalid schemas and keywords the grammar would not enforce get 400 naming them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from moemesh.actors.ingress.protocol import OpenAIError
from moemesh.actors.ingress.structured import response_format_output, unsupported_feature

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "temp": {"type": "integer", "minimum": -50, "maximum": 60},
                                           "unit": {"enum": ["C", "F"]}},
          "required": ["city", "temp", "unit"], "additionalProperties": False}


@pytest.fixture(scope="module")
def api(tiny_openai):
    return tiny_openai


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}


@pytest.mark.parametrize("content", ["Weather in Paris?", "Hello", "The expert mesh"])
def test_json_schema_answer_validates(api, content):
    r = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=200,
                                    temperature=0, response_format=_schema_format(SCHEMA))
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_schema_streamed(api):
    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                         max_tokens=200, temperature=0.8, seed=3, stream=True,
                                         response_format=_schema_format(SCHEMA))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_is_a_prefix_or_an_object(api):
    r = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=60,
                                    temperature=0, response_format={"type": "json_object"})
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith("{")
    if finish == "stop":  # else `length` cut it (a random model may keep a string open)
        assert isinstance(json.loads(text), dict)


def test_bad_schemas_get_400_naming_the_feature(api):
    import openai

    for schema, words in [({"type": "integer", "multipleOf": 3}, ["multipleOf", "/multipleOf"]),
                          ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, ["'not'", "/a/not"]),
                          ({"type": "string", "format": "phone"}, ["format", "phone"]),
                          ({"type": 5}, ["not a valid JSON schema"])]:
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                        response_format=_schema_format(schema))
        assert e.value.body["param"] == "response_format"
        assert all(w in e.value.body["message"] for w in words), e.value.body["message"]


def test_response_format_mapping():
    assert response_format_output(None) is None and response_format_output({"type": "text"}) is None
    assert response_format_output({"type": "json_object"}).kind == "json_object"
    out = response_format_output(_schema_format(SCHEMA))
    assert out.kind == "json_schema" and json.loads(out.json_schema) == SCHEMA
    for bad in [{"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}}},
                {"type": "yaml"}, _schema_format([1])]:
        with pytest.raises(OpenAIError) as e:
            response_format_output(bad)
        assert e.value.status == 400 and e.value.param == "response_format"


def test_supported_keywords_pass_and_nested_ones_are_found():
    ok = {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                          "title": "node"}}, "anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}
    assert unsupported_feature(ok) is None
    assert "uniqueItems" in unsupported_feature({"$defs": {"n": {"type": "array", "uniqueItems": True}}})
    assert "prefixItems/1/allOf" in unsupported_feature({"prefixItems": [{}, {"allOf": [{}]}]})
    assert "$ref" in unsupported_feature({"$ref": "https://example.com/s.json"})
