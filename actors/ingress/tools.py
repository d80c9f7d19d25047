"""`tools`, `tool_choice` and `parallel_tool_calls` of a chat request -> a `ToolPlan`: what the chat template shows
the model, which generated calls the answer parses (actors/ingress/tool_parser.py) and, for `required` or a named
function, the `StructuredOutput` the worker enforces (the grammar of actors/attention/grammar.py: the call markup
around arguments valid against the function's parameters). Every check that can answer 400 is here, naming the
field."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moemesh.actors.ingress.protocol import ChatCompletionRequest, bad_request
from moemesh.actors.ingress.structured import check_schema
from moemesh.actors.request import StructuredOutput, ToolSpec

NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")  # OpenAI's rule for a function name
MAX_TOOLS = 128  # OpenAI's limit


@dataclass(frozen=True)
class ToolPlan:
    """`tools`: what the template shows (OpenAI tool objects; None when the model is not offered any); `names`: the
    calls the answer parses (empty: no parsing, the text is content); `max_calls`: None, or 1 without parallel calls;
    `structured`: the forced calls (required or a named function), else None."""

    tools: list[dict] | None = None
    names: frozenset[str] = field(default_factory=frozenset)
    max_calls: int | None = None
    structured: StructuredOutput | None = None


def tool_plan(req: ChatCompletionRequest) -> ToolPlan:
    """The request's tool plan; `OpenAIError` 400 naming the field for anything it cannot honour."""
    choice = _choice(req.tool_choice, bool(req.tools))
    if not req.tools or choice == "none":  # tools withheld from the model (vLLM's exclude_tools_when_tool_choice_none)
        return ToolPlan()
    if len(req.tools) > MAX_TOOLS:
        raise bad_request(f"tools: at most {MAX_TOOLS} functions, got {len(req.tools)}", "tools")
    forced = choice if choice not in ("auto", "required") else None  # a named function
    if forced is not None or choice == "required":
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise bad_request(f"tool_choice: {choice!r} forces tool calls; it cannot be combined with a "
                              f"response_format", "tool_choice")
    specs = [_spec(i, tool, enforced=choice == "required" or tool_name(tool) == forced)
             for i, tool in enumerate(req.tools)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise bad_request(f"tools: the function name {dup!r} appears more than once", "tools")
    if forced is not None and forced not in names:
        raise bad_request(f"tool_choice.function.name: no function named {forced!r} in tools "
                          f"({', '.join(names)})", "tool_choice")
    max_calls = None if req.parallel_tool_calls else 1
    structured = None
    if choice == "required" or forced is not None:
        allowed = tuple(s for s in specs if forced is None or s.name == forced)
        structured = StructuredOutput(kind="tool_calls", tools=allowed, parallel=req.parallel_tool_calls)
    return ToolPlan(req.tools, frozenset(names), max_calls, structured)


def tool_name(tool: dict) -> str | None:
    function = tool.get("function") if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def _choice(tool_choice, have_tools: bool) -> str:
    """"none", "auto", "required" or the forced function's name."""
    if tool_choice is None:
        return "auto" if have_tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice: expected 'none', 'auto', 'required' or a function, got {tool_choice!r}",
                              "tool_choice")
        if tool_choice == "required" and not have_tools:
            raise bad_request("tool_choice: 'required' needs tools", "tool_choice")
        return tool_choice
    name = tool_name(tool_choice)
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request("tool_choice: a function is chosen as {\"type\": \"function\", \"function\": {\"name\": "
                          "...}}", "tool_choice")
    if not have_tools:
        raise bad_request(f"tool_choice: names the function {name!r} but no tools are given", "tool_choice")
    return name


def _spec(i: int, tool, enforced: bool) -> ToolSpec:
    """tools[i] -> its `ToolSpec`; its parameters must be a valid JSON schema, and one the grammar can enforce when
    calls to it are forced."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                          f"\"parameters\"}}}}", "tools")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad_request(f"{where}.function.name: 1 to 64 letters, digits, underscores or dashes, got {name!r}",
                          "tools")
    if not isinstance(function.get("description", ""), str):
        raise bad_request(f"{where}.function.description: expected a string", "tools")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    text = check_schema(parameters, f"{where}.function.parameters", "tools", enforced=enforced)
    return ToolSpec(name=name, parameters=text)
