"""The tool-call parser on scripted text (actors/ingress/tool_parser.py): whole answers, the same answers streamed in
pieces split at every position (the result must not depend on the split), malformed markup that stays text, cut
calls, parallel_tool_calls false; and the same on token sequences of the tiny tokenizer, decoded by the ingress's
incremental detokenizer one token at a time (markup tokens and markup spelled with byte tokens)."""

from __future__ import annotations

import random

import pytest

from moemesh.actors.ingress.text import TextCodec
from moemesh.actors.ingress.tool_parser import ToolCallParser, parse_tool_calls
from moemesh.kernels.chat_format import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

NAMES = {"get_weather", "add"}


def call(name: str, args: str) -> str:
    return CALL_BEGIN + name + TOOL_SEP + args + CALL_END


TWO_CALLS = "Sure. " + CALLS_BEGIN + call("get_weather", '{"city": "Paris"}') + call("add", '{"a": 1, "b": 2}') + \
    CALLS_END


def streamed(pieces: list[str], names=NAMES, max_calls=None) -> tuple[str, list[dict]]:
    """Feed `pieces` (the last one final); -> (content, calls rebuilt from the deltas as a client does)."""
    parser = ToolCallParser(names, max_calls)
    content, calls = "", []
    for k, piece in enumerate(pieces):
        text, deltas = parser.feed(piece, final=k == len(pieces) - 1)
        content += text
        for d in deltas:
            if "id" in d:  # a call's first delta: index, id, type, name, empty arguments
                assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["arguments"] == ""
                calls.append({"id": d["id"], "name": d["function"]["name"], "arguments": ""})
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, [(c["name"], c["arguments"]) for c in calls]


def whole(text: str, names=NAMES, max_calls=None) -> tuple[str, list[tuple[str, str]]]:
    content, calls = parse_tool_calls(text, names, max_calls)
    return content, [(c.name, c.arguments) for c in calls]


def test_whole_answer():
    assert whole(TWO_CALLS) == ("Sure. ", [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')])
    assert whole("no calls here") == ("no calls here", [])
    assert whole(TWO_CALLS + " after") == ("Sure.  after", whole(TWO_CALLS)[1])
    # a block left open, then another: the first ends at its last call, the second is parsed too
    assert whole(CALLS_BEGIN + call("add", "{}") + " x " + CALLS_BEGIN + call("add", "[]") + CALLS_END) == \
        (" x ", [("add", "{}"), ("add", "[]")])
    _, calls = parse_tool_calls(TWO_CALLS, NAMES)
    assert calls[0].openai() == {"id": calls[0].id, "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


MALFORMED = [
    CALLS_BEGIN + "hello",  # no call begins
    CALLS_BEGIN + call("unknown_tool", "{}") + CALLS_END,  # not a tool of the request
    CALLS_BEGIN + CALL_BEGIN + "get weather" + TOOL_SEP + "{}" + CALL_END + CALLS_END,  # not a name
    CALLS_BEGIN + CALL_BEGIN + "get_weather",  # ends inside the name
    CALLS_BEGIN + CALL_BEGIN + "x" * 80,  # a name far too long, no separator
    "text " + CALLS_BEGIN,  # ends right after the opening marker
    CALL_BEGIN + "add" + TOOL_SEP + "{}" + CALL_END,  # a call without the calls block
    "<｜tool▁calls▁beg",  # a prefix of the marker, then the end
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_markup_stays_text(text):
    assert whole(text) == (text, [])
    for n in range(len(text) + 1):
        assert streamed([text[:n], text[n:]]) == (text, []), n


@pytest.mark.parametrize("text", [TWO_CALLS, TWO_CALLS + "tail", "a" + CALLS_BEGIN + call("add", "{}") + CALLS_END]
                         + MALFORMED)
def test_split_at_every_position_matches_whole(text):
    expected = whole(text)
    assert streamed(list(text[:-1]) + [text[-1:]]) == expected  # one character at a time
    for n in range(len(text) + 1):
        assert streamed([text[:n], text[n:]]) == expected, n
        for m in range(n, len(text) + 1, 7):
            assert streamed([text[:n], text[n:m], text[m:]]) == expected, (n, m)


def test_content_is_released_while_no_markup_can_start():
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello <｜tool") == ("Hello ", [])  # "<｜tool" may begin the marker: held
    assert parser.feed("box>") == ("<｜toolbox>", [])  # it did not
    text, deltas = parser.feed(CALLS_BEGIN + CALL_BEGIN + "add" + TOOL_SEP + '{"a"')
    assert text == "" and [d["function"] for d in deltas] == [{"name": "add", "arguments": ""}, {"arguments": '{"a"'}]
    assert parser.feed(": 1}<｜tool▁call▁e") == ("", [{"index": 0, "function": {"arguments": ": 1}"}}])
    assert parser.feed(CALL_END[len("<｜tool▁call▁e"):] + CALLS_END, final=True) == ("", [])


def test_a_cut_call_keeps_its_arguments():
    text = CALLS_BEGIN + call("add", '{"a": 1}') + CALL_BEGIN + "get_weather" + TOOL_SEP + '{"ci'
    assert whole(text) == ("", [("add", '{"a": 1}'), ("get_weather", '{"ci')])
    assert streamed([text[:-3], text[-3:]]) == whole(text)


def test_parallel_false_keeps_the_first_call_and_hides_the_rest():
    assert whole(TWO_CALLS, max_calls=1) == ("Sure. ", [("get_weather", '{"city": "Paris"}')])
    for n in range(0, len(TWO_CALLS) + 1, 3):
        assert streamed([TWO_CALLS[:n], TWO_CALLS[n:]], max_calls=1) == whole(TWO_CALLS, max_calls=1)


def test_random_markup_never_raises_and_split_does_not_matter():
    """Random sequences of markers, names and text: no exception, streaming equals whole, and every character of the
    input is either content or inside a call's name/arguments or a marker."""
    rng = random.Random(0)
    atoms = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP, "add", "get_weather", "bad name", "{}", '{"a":',
             " x ", "<｜", "｜>", "\n"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        expected = whole(text)
        cut = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cut], [*cut, len(text)])]
        assert streamed(pieces) == expected, text
        content, calls = expected
        assert len(content) + sum(len(n) + len(a) for n, a in calls) <= len(text)


@pytest.fixture(scope="module")
def codec(tiny_model_dir) -> TextCodec:
    return TextCodec.from_checkpoint(tiny_model_dir)


def test_token_sequences_through_the_detokenizer(codec):
    """The tiny tokenizer's markup tokens, and the same markup spelled with byte-level tokens (what a model may also
    emit), decoded one token at a time by the ingress's detokenizer: the same calls either way."""
    markup = codec.tokenizer.encode(TWO_CALLS, add_special_tokens=False).ids
    spelled = _byte_tokens(codec, TWO_CALLS)
    assert len(markup) < len(spelled)
    for ids in (markup, spelled):
        decoder = codec.decoder()
        pieces = [decoder.push([t]) for t in ids] + [decoder.flush()]
        assert streamed(pieces) == whole(TWO_CALLS)


def _byte_tokens(codec: TextCodec, text: str) -> list[int]:
    """`text` as one byte-level token per UTF-8 byte (never the added markup tokens)."""
    from moemesh.actors.ingress.text import _BYTE_OF

    char_of = {b: c for c, b in _BYTE_OF.items()}
    return [codec.tokenizer.token_to_id(char_of[b]) for b in text.encode("utf-8")]
