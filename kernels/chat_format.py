"""The DeepSeek chat format of the built-in models: role and tool-call special tokens and the chat template.

One owner for the markup: the tokenizer writer (kernels/synthetic.py) adds these tokens and writes the template, the
ingress parses generated tool calls with the same strings (actors/ingress/tool_parser.py) and the grammar engine
forces them (actors/attention/grammar.py).

The markup is DeepSeek-V3.1's released tool-call format (no V4 release of it was at hand; V3.2 moved to an XML-like
"DSML" markup, so a V4 checkpoint with its own template and different markup needs its own parser):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS JSON<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

and a tool's result comes back as `<｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>`. The template text is ours.
"""

from __future__ import annotations

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

ROLE_TOKENS = (USER, ASSISTANT)  # special: skipped when decoding (the client never sees role markers)
TOOL_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP, OUTPUT_BEGIN, OUTPUT_END)  # decoded as text:
# the ingress parses the generated markup out of the text (and so never shows it as content)

# Variables (as transformers passes them): messages (OpenAI chat messages: role, content, tool_calls with
# function.name and function.arguments, a JSON string or an object), tools (OpenAI tool objects, or none),
# add_generation_prompt, bos_token, eos_token. System and developer messages go first, then the tools section.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages if m['role'] in ('system', 'developer') %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}"
    "{% endfor %}"
    "{% if tools %}"
    "{{ '\\n\\n' }}## Tools\nYou can call these functions. To call one or more, answer with\n"
    + CALLS_BEGIN + CALL_BEGIN + "NAME" + TOOL_SEP + "ARGUMENTS AS JSON" + CALL_END + CALLS_END + "\n"
    "{% for t in tools %}{% set f = t['function'] if 'function' in t else t %}"
    "{{ '\\n' }}### {{ f['name'] }}\n{% if f.get('description') %}Description: {{ f['description'] }}\n{% endif %}"
    "Parameters: {{ f.get('parameters', {}) | tojson }}\n"
    "{% endfor %}"
    "{% endif %}"
    "{% for m in messages if m['role'] not in ('system', 'developer') %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'tool' %}" + OUTPUT_BEGIN + "{{ m['content'] }}" + OUTPUT_END +
    "{% else %}" + ASSISTANT + "{{ m['content'] or '' }}"
    "{% if m.get('tool_calls') %}" + CALLS_BEGIN +
    "{% for c in m['tool_calls'] %}{% set a = c['function']['arguments'] %}"
    + CALL_BEGIN + "{{ c['function']['name'] }}" + TOOL_SEP +
    "{{ a if a is string else a | tojson }}" + CALL_END +
    "{% endfor %}" + CALLS_END +
    "{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
