"""`response_format` and `tools` of a chat request -> the `StructuredOutput` the worker enforces, with every check
that can answer 400 here: the schema is a valid JSON schema (jsonschema's metaschema check) and uses only keywords
the grammar engine enforces (xgrammar accepts some keywords it does not enforce, such as `multipleOf` or `not`;
those are refused by name rather than answered unconstrained)."""

from __future__ import annotations

import json
from typing import Any

from moemesh.actors.ingress.protocol import bad_request
from moemesh.actors.request import StructuredOutput

# Keywords the grammar enforces (or that only annotate); anything else in a schema is refused.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minProperties", "maxProperties"})
ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
                         "readOnly", "writeOnly", "strict"})
FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "uuid", "uri", "ipv4", "ipv6", "hostname"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")
MAX_SCHEMA_BYTES = 64 * 1024


def response_format_output(response_format: dict | None) -> StructuredOutput | None:
    """OpenAI's `response_format` -> what the worker enforces (None for text). 400 naming the field otherwise."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(kind="json_object")
    if kind != "json_schema":
        raise bad_request(f"response_format.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}",
                          "response_format")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request("response_format.json_schema: an object with a 'name' (string) and a 'schema' is needed",
                          "response_format")
    schema = spec.get("schema", {})
    return StructuredOutput(kind="json_schema", json_schema=check_schema(schema, "response_format.json_schema.schema",
                                                                         "response_format"))


def check_schema(schema: Any, where: str, param: str, enforced: bool = True) -> str:
    """A JSON schema the grammar can enforce -> its JSON text; 400 (`param`) naming the problem at `where`.
    `enforced=False`: a schema only shown to the model (tools under tool_choice "auto"): only its validity counts."""
    import jsonschema

    if not isinstance(schema, dict):
        raise bad_request(f"{where}: a JSON schema is an object, got {type(schema).__name__}", param)
    text = json.dumps(schema, sort_keys=True)
    if len(text) > MAX_SCHEMA_BYTES:
        raise bad_request(f"{where}: at most {MAX_SCHEMA_BYTES} bytes of schema, got {len(text)}", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p!r}]" for p in e.absolute_path)
        raise bad_request(f"{where}{path}: not a valid JSON schema: {e.message}", param) from None
    problem = unsupported_feature(schema) if enforced else None
    if problem is not None:
        raise bad_request(f"{where}: unsupported JSON schema feature {problem} (structured output cannot enforce "
                          f"it; supported: {', '.join(sorted(ENFORCED))})", param)
    return text


def unsupported_feature(schema: Any, path: str = "") -> str | None:
    """The first keyword (quoted, with its path) the grammar would not enforce, or None."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"{path or '/'} (not a schema)"
    for key, value in schema.items():
        here = f"{path}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            return f"{key!r} at {here}"
        if key == "format" and value not in FORMATS:
            return f"'format': {value!r} at {here} (enforced formats: {', '.join(sorted(FORMATS))})"
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            return f"'$ref' to {value!r} at {here} (only references inside the schema, '#/...')"
        children = []
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            children = [(f"{here}/{k}", v) for k, v in value.items()]
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            children = [(f"{here}/{i}", v) for i, v in enumerate(value)]
        elif key in _SUBSCHEMAS:
            children = [(here, value)]
        for where, child in children:
            problem = unsupported_feature(child, where)
            if problem is not None:
                return problem
    return None
